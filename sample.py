"""Generate text from a trained checkpoint.

    python sample.py ckpt=out/<run> start="ROMEO:" num_samples=3 max_new_tokens=200

`ckpt` is a checkpoint file or a run folder (its newest checkpoint is used). `start` is the
prompt; `start=FILE:prompt.txt` reads it from a file. All keys are fields of `SampleConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from topolm.checkpoint import load_model, require_gpt2_tokenizer, require_positions
from topolm.config import (InferenceKeys, SeedKey, UserError, cli_main, load_config, require, require_finite,
                           resolve_device)
from topolm.files import read_text
from topolm.signals import exit_on_stop
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding


@dataclass
class SampleConfig(InferenceKeys, SeedKey):
    """sample.py's keys: its own below; ckpt and device from topolm.config.InferenceKeys, seed (of the
    sampling generator) from topolm.config.SeedKey."""
    start: str = "\n"
    """Prompt text, or FILE:<path> to read it from a file."""
    num_samples: int = 3
    """Samples to draw."""
    max_new_tokens: int = 200
    """Tokens generated per sample."""
    temperature: float = 0.8
    """Softmax temperature, > 0: < 1 sharper, > 1 more random."""
    top_k: int = 200
    """Sample among the k most likely tokens; 0 keeps all."""

    def __post_init__(self):
        super().__post_init__()
        require(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        require(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        require_finite(self.temperature, "temperature")
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        require(self.top_k >= 0, f"top_k={self.top_k} must be >= 0")


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: SampleConfig = load_config(SampleConfig, argv)
    device = resolve_device(cfg.device)
    start = cfg.start
    if start.startswith("FILE:"):  # read before the model loads: a bad file is refused at once
        prompt_file = Path(start[5:])
        if not prompt_file.is_file():
            raise UserError(f"prompt file not found: {prompt_file}")
        start = read_text(prompt_file)
    model, ckpt, path = load_model(cfg.ckpt, device)
    require_positions(ckpt, path, "sampling")
    require_gpt2_tokenizer(ckpt, path, "sampling from a text prompt")
    enc = gpt2_encoding()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    print(f"# samples from {path}")
    for _ in range(cfg.num_samples):
        y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, generator=g)
        tokens = [t for t in y[0].tolist() if t < enc.n_vocab]
        print(enc.decode(tokens))
        print("-" * 60)


if __name__ == "__main__":
    cli_main(main)
