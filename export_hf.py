"""Write a checkpoint as a Hugging Face folder (GPT2LMHeadModel), with its unit positions beside it.

    python export_hf.py ckpt=out/<run> out=hf/<name>
    lm_eval --model hf --model_args pretrained=hf/<name> --tasks blimp     # the field's suites (extra `hf`)

lm-eval's blimp task scores " " + sentence after <|endoftext|>: blimp.py's leading_space=true, not its
default (docs/interoperability.md shows the lm_eval run over local pairs that is tested).

The folder holds config.json and model.safetensors (loadable by `transformers` offline:
`GPT2LMHeadModel.from_pretrained(folder)`), the GPT-2 tokenizer files (vocab.json, merges.txt,
tokenizer.json, tokenizer_config.json) when the model's ids are GPT-2's, and `positions.npy` +
`topolm.json`: the sheet, which Hugging Face's model has no place for (see topolm/hf.py). A finetuned
checkpoint exports its backbone; the classifier head is not part of GPT2LMHeadModel. Needs
requirements-hf.txt (transformers, safetensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from topolm.checkpoint import load_model
from topolm.config import CheckpointKey, UserError, cli_main, load_config, require
from topolm.files import require_writable


@dataclass
class ExportConfig(CheckpointKey):
    """export_hf.py's keys: its own below; ckpt (the checkpoint exported) from topolm.config.CheckpointKey."""
    out: str = ""
    """Folder to write."""
    overwrite: bool = False
    """Replace `out` if it exists."""

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.out), "out= is required: the folder to write")


def main(argv: list[str]) -> None:
    cfg: ExportConfig = load_config(ExportConfig, argv)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    require_writable(out.parent)
    from topolm.hf import export_hf, require_full_softmax

    gpt, ckpt, path = load_model(cfg.ckpt)
    require_full_softmax(gpt, str(path))  # before the packages: no install for a model that cannot go
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"export needs the packages of requirements-hf.txt ({e.name} is missing): "
                        f"pip install -r requirements-hf.txt") from e
    files = export_hf(gpt, ckpt, out, str(path), overwrite=cfg.overwrite)
    if "head" in ckpt:
        print(f"note: {path} is finetuned ({ckpt['task']['name']}); its backbone is exported, not its head")
    if "tokenizer.json" not in files:
        print(f"note: {path} is a model of token ids (vocab_size={gpt.config.vocab_size}), not GPT-2 text: "
              f"no tokenizer files written")
    print(f"exported {path} ({'permutation' if ckpt['layout']['permutation'] else 'non-permutation'} layout) "
          f"to {out}: {', '.join(files)}")


if __name__ == "__main__":
    cli_main(main)
