"""Generate text from a trained checkpoint.

    python sample.py ckpt=out/shakespeare start="ROMEO:" num_samples=3 max_new_tokens=200

`ckpt` is a checkpoint file or a run folder (its newest checkpoint is used). `start` is the
prompt; `start=FILE:prompt.txt` reads it from a file. All keys are fields of `SampleConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import load_model, require_gpt2_tokenizer
from common import EOT_TOKEN, UserError, check_seed, cli_main, gpt2_encoding, load_config, require


@dataclass
class SampleConfig:
    ckpt: str = "out/shakespeare"
    """Checkpoint file, or run folder whose newest checkpoint is used."""
    start: str = "\n"
    """Prompt text, or FILE:<path> to read it from a file."""
    num_samples: int = 3
    """Samples to draw."""
    max_new_tokens: int = 200
    """Tokens generated per sample."""
    temperature: float = 0.8
    """Softmax temperature: < 1 sharper, > 1 more random."""
    top_k: int = 200
    """Sample among the k most likely tokens; 0 keeps all."""
    seed: int = 1337
    """Seed of the sampling generator."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N'."""

    def __post_init__(self):
        require(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        require(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        require(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        require(self.top_k >= 0, f"top_k={self.top_k} must be >= 0")
        check_seed(self.seed)
        require(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
                f"device must be cpu, cuda or cuda:N; got '{self.device}'")


def main(argv: list[str]) -> None:
    cfg: SampleConfig = load_config(SampleConfig, argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA device is available")
    model, ckpt, path = load_model(cfg.ckpt, cfg.device)
    require_gpt2_tokenizer(ckpt, path, "sampling from a text prompt")
    enc = gpt2_encoding()
    start = cfg.start
    if start.startswith("FILE:"):
        prompt_file = Path(start[5:])
        if not prompt_file.is_file():
            raise UserError(f"prompt file not found: {prompt_file}")
        start = prompt_file.read_text(encoding="utf-8")
    ids = enc.encode(start, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    x = torch.tensor([ids], dtype=torch.long, device=cfg.device)
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    print(f"# samples from {path}")
    for _ in range(cfg.num_samples):
        y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, generator=g)
        tokens = [t for t in y[0].tolist() if t < enc.n_vocab]
        print(enc.decode(tokens))
        print("-" * 60)


if __name__ == "__main__":
    cli_main(main)
