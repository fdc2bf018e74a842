"""Convert a checkpoint of the TopoLM research code (and its positions folder) into this project's format.

    python import_research.py ckpt=path/to/ckpt.pt positions=path/to/gpt2-positions-5-5 out=out/imported/ckpt.pt

The research checkpoint (`torch.save` of model, optimizer, model_args, iter_num, best_val_loss and a
pickled OmegaConf config) and its positions (`layer.{i}.{attn,mlp}.pkl`, pickled
`positions.LayerPositions`) are read by a restricted unpickler that runs no code from the files
(topolm/research.py); the optimizer state is not read. The result is a `kind: imported` checkpoint
(topolm/checkpoint.py) that sample.py, finetune.py, blimp.py, ablate.py, export_hf.py and the analysis
load like any other; its `data` names the research config's dataset when that is a plain name (else
it is null). A layout that is not a permutation of the grid (the research code's
pre-optimized sets) is kept exactly, shared cells included, and flagged (`layout.permutation`
false): it works for sampling, for finetuning with alpha_scale=0 and for the analysis; anything
that needs the spatial loss refuses it. Refused with one line: head_loss or attn_proj on, or a
non-zero activation_decay (unless ignore_activation_decay=true), or weights that do not fit; and
every malformed file, saying what is wrong with it: empty, truncated, not a checkpoint, torch's
legacy format, a pickled global outside the allow-list, a tensor larger than its storage, a field
not of its kind, sizes that disagree with the weights. Weight names may carry the DDP and
torch.compile prefixes (`module.`, `_orig_mod.`) in any nesting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from topolm.checkpoint import (checkpoint_path, data_record, make_payload, plain_dataset, save_checkpoint,
                               tokenizer_for)
from topolm.config import UserError, cli_main, load_config, require
from topolm.files import names_folder, require_writable
from topolm.research import convert_research


@dataclass
class ImportConfig:
    ckpt: str = ""
    """The research checkpoint (a torch.save zip file, e.g. ckpt.pt)."""
    positions: str = ""
    """Its positions folder (layer.{i}.attn.pkl and layer.{i}.mlp.pkl for every layer)."""
    out: str = ""
    """Checkpoint file to write (this project's format); a folder (a value ending in / or an existing folder)
    gets ckpt-<iteration>.pt inside it, a run folder that ckpt=<folder> reads."""
    overwrite: bool = False
    """Replace `out` if it exists."""
    ignore_activation_decay: bool = False
    """Convert a model trained with a non-zero activation_decay anyway (for sampling and analysis: this
    trainer has no such term, so continued training would change the objective)."""

    def __post_init__(self):
        for key in ("ckpt", "positions", "out"):
            require(bool(getattr(self, key)), f"{key}= is required")


def main(argv: list[str]) -> None:
    cfg: ImportConfig = load_config(ImportConfig, argv)
    # A folder (a trailing / or an existing folder) gets ckpt-<iteration>.pt, so that ckpt=<folder> finds it.
    into_folder = names_folder(cfg.out)
    out = Path(cfg.out)
    if not into_folder and out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    require_writable(out if into_folder else out.parent)
    gpt, record = convert_research(Path(cfg.ckpt), Path(cfg.positions), cfg.ignore_activation_decay)
    if into_folder:
        out = checkpoint_path(out, record["iter_num"])
        if out.exists() and not cfg.overwrite:
            raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    c = gpt.config
    dataset = plain_dataset(record["config"])  # where the research code's data lived is not ours to resolve
    payload = make_payload(gpt, kind="imported", config=asdict(cfg), iter_num=record["iter_num"],
                           tokenizer=tokenizer_for(c.vocab_size), layout_source=f"research positions {cfg.positions}",
                           data=data_record(dataset, None, None) if dataset else None, research=record)
    save_checkpoint(payload, out)
    perm = payload["layout"]["permutation"]
    coords = gpt.sheet.unit_coords
    cells = [len({tuple(xy) for xy in site.tolist()}) for site in coords]
    print(f"imported {cfg.ckpt} (iteration {record['iter_num']}): {c.n_layer} layers, n_embed {c.n_embed}, "
          f"vocab {c.vocab_size}, with_resid={c.with_resid}"
          f"{'' if record['with_resid_in_model_args'] else ' (not in model_args: older research code)'}, "
          f"alpha {c.alpha_label()[1:]}, radius {c.radius}, {c.neighborhoods_per_batch} neighborhoods per batch")
    if perm:
        print(f"positions from {cfg.positions}: a permutation of the {c.n_embed} cells at every site")
    else:
        print(f"positions from {cfg.positions}: NOT a permutation ({min(cells)}-{max(cells)} distinct cells of "
              f"{c.n_embed} per site), kept exactly; sampling, finetuning with alpha_scale=0 and the analysis work, "
              f"the spatial loss refuses this layout")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
