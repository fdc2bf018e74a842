"""Ablate the most language-selective units and compare with random units (the paper's causal test).

    python ablate.py ckpt=out/<run> units=analysis/<run>/units.npz k=50 dataset=fineweb
    python ablate.py ckpt=out/<run> units=.../units.npz k=50 data_dir=path/to/blimp/data paradigms=wh_island

Conditions: the intact model; the k units with the largest language-localizer t (sentences vs
nonword lists, `t_localizer` of analyze.py's units.npz) zeroed at every site; and `draws` sets of
k units drawn at random from every site, zeroed the same way (mean, standard deviation, min and
max over the draws). Units are zeroed where the site's activation is (topolm.ablation.zeroed_units): with
with_resid=False that removes exactly those units' contribution to the residual stream. Each
condition is scored on BLiMP (as blimp.py) and, with `dataset`, on the validation loss over the
same fixed windows of val.bin. Prints a table and writes JSON (`out`, default
`<checkpoint>.ablation-k<k>.json` beside the checkpoint).

Refused before any scoring: a units file whose provenance names other weights than the checkpoint's
(a control and its topographic model share their layout, so only the weights digest tells them apart),
or that records none; and a site with fewer than k units whose t is defined (an undefined t is no
selectivity).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from topolm.checkpoint import load_model, require_gpt2_tokenizer, require_positions
from topolm.config import DATA_DIR, SeedKey, UserError, cli_main, load_config, require, resolve_device, resolve_path
from topolm.files import atomic_write, open_tokens, output_file, require_writable
from topolm.provenance import provenance
from topolm.signals import exit_on_stop, held
from topolm.tokenizer import gpt2_encoding
from topolm.ablation import (load_units, random_units, top_units, validation_loss, validation_windows,
                             zeroed_units)
from topolm.blimp import BlimpKeys, load_blimp_hub, load_blimp_local, score_blimp


@dataclass
class AblateConfig(BlimpKeys, SeedKey):
    """ablate.py's keys: its own below; ckpt, device, data_dir, paradigms, batch_size and leading_space from
    topolm.blimp.BlimpKeys, seed from topolm.config.SeedKey."""
    units: str = ""
    """units.npz written by analyze.py for this checkpoint (site_names, coords, t_localizer, provenance naming
    this checkpoint's weights)."""
    k: int = 10
    """Units zeroed per site."""
    draws: int = 5
    """Random draws of k units per site (at least 5)."""
    seed: int = 0
    """Seed of the random draws (and of the validation windows); default 0, the documented results' draws."""
    dataset: str = ""
    """Folder with val.bin (a bare name means data/<name>) for the validation loss; empty skips it."""
    val_batches: int = 20
    """Validation batches per condition."""
    val_batch_size: int = 8
    """Windows of block_size tokens per validation batch."""
    out: str = ""
    """JSON results file; empty writes <checkpoint file>.ablation-k<k>.json beside the checkpoint; a folder (a
    value ending in / or an existing folder) gets that file name inside it."""

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.units), "units= is required: the units.npz of analyze.py for this checkpoint")
        require(self.k >= 1, f"k={self.k} must be >= 1")
        require(self.draws >= 5, f"draws={self.draws} must be >= 5 (the spread of the random control needs several)")
        for key in ("val_batches", "val_batch_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max()),
            "values": v.tolist()}


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: AblateConfig = load_config(AblateConfig, argv)
    device = resolve_device(cfg.device)
    model, ckpt, path = load_model(cfg.ckpt, device)
    require_positions(ckpt, path, "the ablation")
    source = provenance(path, ckpt, model)
    require_gpt2_tokenizer(ckpt, path, "BLiMP")
    out = output_file(cfg.out, f"{path.name}.ablation-k{cfg.k}.json", path.parent)
    require_writable(out.parent)
    n_embed, names = model.config.n_embed, list(model.site_names)
    if cfg.k > n_embed:
        raise UserError(f"k={cfg.k} exceeds the {n_embed} units of a site")
    units = load_units(Path(cfg.units), model, source)
    units_source = json.loads(str(units["provenance"]))
    selective = top_units(units["t_localizer"], cfg.k, names, f"units={cfg.units}")
    val_tokens = None
    if cfg.dataset:
        val_file = resolve_path(cfg.dataset, DATA_DIR) / "val.bin"
        val_tokens = open_tokens(val_file, model.config.block_size, model.config.vocab_size)
        validation_windows(model, val_tokens, cfg.val_batches * cfg.val_batch_size, cfg.seed)  # refused before any work
    pairs = load_blimp_local(Path(cfg.data_dir), cfg.paradigms) if cfg.data_dir else load_blimp_hub(cfg.paradigms)
    enc = gpt2_encoding()

    def measure(chosen: np.ndarray | None, label: str) -> dict:
        sites = {} if chosen is None else {name: chosen[s] for s, name in enumerate(names)}
        with zeroed_units(model, sites):
            r = score_blimp(model, pairs, enc, cfg.batch_size, device, progress=False, leading_space=cfg.leading_space)
            loss = (validation_loss(model, val_tokens, cfg.val_batches, cfg.val_batch_size, cfg.seed, device)
                    if val_tokens is not None else None)
        skipped = r["overall"]["not_scorable"]
        print(f"  {label}: BLiMP {r['overall']['accuracy']:.4f}" + (f", val loss {loss:.4f}" if loss is not None else "")
              + (f" ({skipped} of {len(pairs)} pairs not scorable: a token outside the output vocabulary)"
                 if skipped else ""))
        return {"blimp": r["overall"]["accuracy"], "blimp_paradigm_mean": r["overall"]["paradigm_mean"],
                "phenomena": {p: e["accuracy"] for p, e in r["phenomena"].items()}, "val_loss": loss,
                "not_scorable": r["overall"]["not_scorable"]}

    print(f"ablating k={cfg.k} of {n_embed} units at each of {len(names)} sites; {len(pairs)} BLiMP pairs"
          + (f", {cfg.val_batches} x {cfg.val_batch_size} validation windows" if val_tokens is not None else ""))
    significant = (np.take_along_axis(units["selective_localizer"], selective, axis=1).sum(axis=1).tolist()
                   if "selective_localizer" in units else None)
    rng = np.random.default_rng(cfg.seed)
    draws = [random_units(len(names), n_embed, cfg.k, rng) for _ in range(cfg.draws)]

    intact = measure(None, "intact")
    top = measure(selective, f"top-{cfg.k} selective")
    random_runs = [measure(d, f"random draw {i + 1}") for i, d in enumerate(draws)]
    rand = {"blimp": spread([r["blimp"] for r in random_runs]),
            "val_loss": spread([r["val_loss"] for r in random_runs]) if val_tokens is not None else None,
            "draws": [{**r, "units": {name: d[s].tolist() for s, name in enumerate(names)}}
                      for r, d in zip(random_runs, draws)]}

    def row(label, blimp, loss):
        return f"{label:<28} {blimp:>24} {loss:>24}"
    fmt = "{:.4f}".format
    print()
    print(row("condition", "BLiMP accuracy", "validation loss"))
    print(row("intact", fmt(intact["blimp"]), fmt(intact["val_loss"]) if val_tokens is not None else "-"))
    print(row(f"top-{cfg.k} selective per site", fmt(top["blimp"]),
              fmt(top["val_loss"]) if val_tokens is not None else "-"))

    def summary(s):
        return f"{s['mean']:.4f} +- {s['std']:.4f}" if s else "-"
    print(row(f"random {cfg.k} per site ({cfg.draws}x)", summary(rand["blimp"]), summary(rand["val_loss"])))

    record = {"checkpoint": str(path), "provenance": source, "units_file": cfg.units, "units_provenance": units_source,
              "config": asdict(cfg), "k": cfg.k,
              "n_pairs": len(pairs), "not_scorable": intact["not_scorable"], "intact": intact,
              "selective": {**top, "units": {name: selective[s].tolist() for s, name in enumerate(names)},
                            "significant_per_site": significant},
              "random": rand}
    with held(f"{out} was written in full"):  # a stop during the write lets it finish
        atomic_write(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
