"""Ablate the most language-selective units and compare with random units (the paper's causal test).

    python ablate.py ckpt=out/<run> units=analysis/<run>/units.npz k=50 dataset=fineweb
    python ablate.py ckpt=out/<run> units=.../units.npz k=50 data_dir=path/to/blimp/data paradigms=wh_island
    python ablate.py ckpt=out/<run> units=.../units.npz k=0,1,28,196,392,784,1568,3136,12544 select=network \\
        where=input control=out/<control> control_units=.../compare_units.npz dataset=fineweb   # the paper's sweep

Conditions, for every k of the list `k` (one number, or a sweep): the k units with the largest
language-localizer t (sentences vs nonword lists, `t_localizer` of analyze.py's units.npz) zeroed,
chosen at every site (`select=site`: k per site) or over the whole network (`select=network`: k in
all, the paper's); and `draws` sets of as many units drawn at random at every site as the top-k put
there, zeroed the same way (mean, standard deviation, min and max over the draws). k = 0 is the
intact model. Units are zeroed where the site's activation is (`where=site`: with with_resid=False
that removes exactly those units' contribution to the residual stream) or in the same dimensions of
the input of the site's sublayer (`where=input`: the input columns of c_attn or c_fc, the research
code's ablation); topolm.ablation.zeroed_units, hooks only, the weights are never changed. Each
condition is scored on BLiMP (as blimp.py) and, with `dataset`, on the validation loss over the same
fixed windows of val.bin. With `control` (and its `control_units`), the control model is swept the
same way. Prints a table per model and writes one JSON (`out`, default
`<checkpoint>.ablation[-network][-input]-k<k>[-<k>...].json` beside the checkpoint) and one PNG of
the curves beside it (the same name, .png): the model and its control side by side.

Refused before any scoring: a units file whose provenance names other weights than its checkpoint's
(a control and its topographic model share their layout, so only the weights digest tells them apart),
or that records none; a k above the units of a site (select=site: n_embed) or of the network
(select=network: n_sites x n_embed); a k above the units whose t is defined (an undefined t is no
selectivity); a control of another shape than the model.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from topolm.checkpoint import load_model, require_gpt2_tokenizer, require_positions
from topolm.config import DATA_DIR, SeedKey, UserError, cli_main, load_config, require, resolve_device, resolve_path
from topolm.files import atomic_write, open_tokens, output_file, require_writable
from topolm.provenance import provenance
from topolm.signals import exit_on_stop, held
from topolm.tokenizer import gpt2_encoding
from topolm.ablation import (chosen_units, load_units, random_units, validation_loss, validation_windows,
                             zeroed_units)
from topolm.blimp import BlimpKeys, load_blimp_hub, load_blimp_local, score_blimp


def parse_k(text: str) -> list[int]:
    """The k of `k=`: one number or a comma-separated list of numbers >= 0, in increasing order.
    Raises ValueError (one line naming the key) for anything else and for a number given twice."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", item) for item in items):
        raise ValueError(f"k={text} must be a number of units >= 0 or a comma-separated list of them "
                         f"(e.g. k=50, or k=0,1,28,196)")
    ks = [int(item) for item in items]
    twice = sorted({k for k in ks if ks.count(k) > 1})
    require(not twice, f"k={text} lists {', '.join(map(str, twice))} more than once")
    return sorted(ks)


@dataclass
class AblateConfig(BlimpKeys, SeedKey):
    """ablate.py's keys: its own below; ckpt, device, data_dir, paradigms, batch_size and leading_space from
    topolm.blimp.BlimpKeys, seed from topolm.config.SeedKey."""
    units: str = ""
    """units.npz written by analyze.py for this checkpoint (site_names, coords, t_localizer, provenance naming
    this checkpoint's weights)."""
    k: str = "10"
    """Units zeroed: one number, or a comma-separated list for a sweep (e.g. 0,1,28,196); per site with
    select=site (at most n_embed), in all with select=network (at most n_sites x n_embed); 0 is the intact
    model."""
    select: Literal["site", "network"] = "site"
    """Which units are the k most selective: 'site', the k largest t_localizer at every site (k x n_sites units
    in all); 'network', the k largest over all sites together (the paper's), however many that puts at a site."""
    where: Literal["site", "input"] = "site"
    """Where a unit is zeroed: 'site', the site's activation (with with_resid=false: what the sublayer adds to
    the residual stream in that dimension); 'input', that dimension of the sublayer's input, i.e. the input
    column of c_attn (attn site) or c_fc (mlp site) of the site's block (the research code's ablation, whose
    numbers the paper reports). Hooks only: the weights are never changed."""
    draws: int = 5
    """Random draws at every k (at least 5): as many units at every site as the top-k put there."""
    seed: int = 0
    """Seed of the random draws (each k's from (seed, k), so a sweep draws what a run of that k alone draws) and
    of the validation windows; default 0, the documented results' draws."""
    control: str = ""
    """Optional second model (e.g. the alpha=0 control; a checkpoint file or run folder), swept the same way
    and drawn beside the first; needs control_units."""
    control_units: str = ""
    """The control's units.npz (analyze.py's compare_units.npz, or its units.npz of the control alone)."""
    dataset: str = ""
    """Folder with val.bin (a bare name means data/<name>) for the validation loss; empty skips it."""
    val_batches: int = 20
    """Validation batches per condition."""
    val_batch_size: int = 8
    """Windows of block_size tokens per validation batch."""
    out: str = ""
    """JSON results file; empty writes <checkpoint file>.ablation[-network][-input]-k<k>[-<k>...].json beside the
    checkpoint; a folder (a value ending in / or an existing folder) gets that file name inside it. The curves'
    PNG goes beside it, with .png for .json."""

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.units), "units= is required: the units.npz of analyze.py for this checkpoint")
        parse_k(self.k)
        require(self.draws >= 5, f"draws={self.draws} must be >= 5 (the spread of the random control needs several)")
        require(bool(self.control) == bool(self.control_units),
                "control= and control_units= go together: the control's checkpoint and the units.npz of analyze.py "
                "for it" + (f" (control={self.control} has no control_units=)" if self.control else ""))
        for key in ("val_batches", "val_batch_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")

    def k_values(self) -> list[int]:
        return parse_k(self.k)


@dataclass
class Subject:
    """A model swept: its checkpoint, its units file and the most selective units at every k."""
    role: str  # "model" or "control": the keys it came from
    model: object
    path: Path
    provenance: dict
    units_file: str
    units: dict
    units_provenance: dict
    chosen: dict  # k -> one int array per site

    @property
    def title(self) -> str:
        return f"{self.path.parent.name} (step {self.provenance.get('step')})"

    @property
    def names(self) -> list[str]:
        return list(self.model.site_names)


def check_k(ks: list[int], select: str, model, key: str) -> None:
    """Refuse a k above the units there are: n_embed per site (select=site), n_sites x n_embed in all (network)."""
    n_embed, n_sites = model.config.n_embed, model.config.n_sites
    top = max(ks)
    if select == "site" and top > n_embed:
        raise UserError(f"k={top} exceeds the {n_embed} units of a site of {key} (select=site zeroes k units at "
                        f"every site): choose k <= {n_embed}, or select=network for a count over the whole network")
    if select == "network" and top > n_sites * n_embed:
        raise UserError(f"k={top} exceeds the {n_sites * n_embed} units of the network of {key} ({n_sites} sites x "
                        f"{n_embed} units): choose k <= {n_sites * n_embed}")


def load_subject(cfg: AblateConfig, role: str, device: str) -> Subject:
    """The model of `ckpt` (role 'model') or `control` (role 'control'), its units checked, every k's units chosen."""
    ckpt_arg, units_key = (cfg.ckpt, "units") if role == "model" else (cfg.control, "control_units")
    units_file = getattr(cfg, units_key)
    model, ckpt, path = load_model(ckpt_arg, device)
    require_positions(ckpt, path, "the ablation")
    source = provenance(path, ckpt, model)
    require_gpt2_tokenizer(ckpt, path, "BLiMP")
    ks = cfg.k_values()
    check_k(ks, cfg.select, model, path)
    units = load_units(Path(units_file), model, source)
    t = units["t_localizer"]
    chosen = {k: chosen_units(t, k, cfg.select, list(model.site_names), f"{units_key}={units_file}") for k in ks}
    return Subject(role, model, path, source, units_file, units, json.loads(str(units["provenance"])), chosen)


def default_name(path: Path, cfg: AblateConfig) -> str:
    modes = ("-network" if cfg.select == "network" else "") + ("-input" if cfg.where == "input" else "")
    return f"{path.name}.ablation{modes}-k{'-'.join(map(str, cfg.k_values()))}.json"


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max()),
            "values": v.tolist()}


@dataclass
class Scoring:
    """What every condition is scored on, and how."""
    cfg: AblateConfig
    device: str
    pairs: object  # topolm.blimp pairs
    enc: object
    val_tokens: np.ndarray | None


def measure(model, chosen: list[np.ndarray] | None, scoring: Scoring, label: str) -> dict:
    """BLiMP and the validation loss of `model` with the units `chosen` (one array per site; None: none) zeroed."""
    cfg, names = scoring.cfg, list(model.site_names)
    sites = {} if chosen is None else {name: chosen[s] for s, name in enumerate(names)}
    with zeroed_units(model, sites, cfg.where):
        r = score_blimp(model, scoring.pairs, scoring.enc, cfg.batch_size, scoring.device, progress=False,
                        leading_space=cfg.leading_space)
        loss = (validation_loss(model, scoring.val_tokens, cfg.val_batches, cfg.val_batch_size, cfg.seed,
                                scoring.device) if scoring.val_tokens is not None else None)
    skipped = r["overall"]["not_scorable"]
    print(f"  {label}: BLiMP {r['overall']['accuracy']:.4f}" + (f", val loss {loss:.4f}" if loss is not None else "")
          + (f" ({skipped} of {len(scoring.pairs)} pairs not scorable: a token outside the output vocabulary)"
             if skipped else ""))
    return {"blimp": r["overall"]["accuracy"], "blimp_paradigm_mean": r["overall"]["paradigm_mean"],
            "phenomena": {p: e["accuracy"] for p, e in r["phenomena"].items()}, "val_loss": loss,
            "not_scorable": r["overall"]["not_scorable"]}


def per_site(names: list[str], chosen: list[np.ndarray]) -> dict:
    return {name: np.asarray(chosen[s]).tolist() for s, name in enumerate(names)}


def sweep_entry(subject: Subject, k: int, scoring: Scoring, intact: dict) -> dict:
    """One k: the top-k condition and its random draws (k = 0: the intact model, nothing zeroed)."""
    cfg, names, chosen = scoring.cfg, subject.names, subject.chosen[k]
    counts = [len(c) for c in chosen]
    rng = np.random.default_rng([cfg.seed, k])  # this k's own stream: a sweep draws what a single-k run draws
    draws = [random_units(counts, subject.model.config.n_embed, rng) for _ in range(cfg.draws)]
    if k == 0:
        top, runs = intact, [intact] * cfg.draws
    else:
        what = f"{k} per site" if cfg.select == "site" else f"{k} over the network"
        top = measure(subject.model, chosen, scoring, f"top {what}")
        runs = [measure(subject.model, d, scoring, f"random {what}, draw {i + 1}") for i, d in enumerate(draws)]
    units = subject.units
    significant = ([int(units["selective_localizer"][s, c].sum()) for s, c in enumerate(chosen)]
                   if "selective_localizer" in units else None)
    with_loss = scoring.val_tokens is not None
    return {"k": k, "n_units": int(sum(counts)), "units_per_site": counts,
            "selective": {**top, "units": per_site(names, chosen), "significant_per_site": significant},
            "random": {"blimp": spread([r["blimp"] for r in runs]),
                       "val_loss": spread([r["val_loss"] for r in runs]) if with_loss else None,
                       "draws": [{**r, "units": per_site(names, d)} for r, d in zip(runs, draws)]}}


def sweep(subject: Subject, scoring: Scoring) -> dict:
    """The record of one model: its provenance, the intact model's scores and one entry per k."""
    print(f"{subject.role} {subject.path}:")
    start = time.perf_counter()
    intact = measure(subject.model, None, scoring, "intact")
    print(f"  (the intact model in {time.perf_counter() - start:.1f} s)")
    entries = []
    for k in scoring.cfg.k_values():
        start = time.perf_counter()
        entries.append(sweep_entry(subject, k, scoring, intact))
        if k:
            print(f"  (k={k}: {1 + scoring.cfg.draws} conditions in {time.perf_counter() - start:.1f} s)")
    return {"checkpoint": str(subject.path), "provenance": subject.provenance, "units_file": subject.units_file,
            "units_provenance": subject.units_provenance, "intact": intact, "sweep": entries}


def print_table(subject: Subject, record: dict, cfg: AblateConfig, with_loss: bool) -> None:
    def fmt(value):
        return f"{value:.4f}" if value is not None else "-"

    def summary(s):
        return f"{s['mean']:.4f} +- {s['std']:.4f}" if s else "-"
    per = "per site" if cfg.select == "site" else "in all"
    print()
    print(f"{subject.title}: select={cfg.select}, where={cfg.where}; random: {cfg.draws} draws, mean +- std")
    row = "{:>7} {:>12} {:>12} {:>20} {:>12} {:>20}"
    print(row.format(f"k {per}", "units zeroed", "top-k BLiMP", "random BLiMP", "top-k loss", "random loss"))
    print(row.format(0, 0, fmt(record["intact"]["blimp"]), "(intact)", fmt(record["intact"]["val_loss"]), "(intact)"))
    for e in record["sweep"]:
        if e["k"] > 0:
            print(row.format(e["k"], e["n_units"], fmt(e["selective"]["blimp"]), summary(e["random"]["blimp"]),
                             fmt(e["selective"]["val_loss"]), summary(e["random"]["val_loss"]) if with_loss else "-"))


def figure_path(out: Path) -> Path:
    return out.with_suffix(".png") if out.suffix == ".json" else out.with_name(out.name + ".png")


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: AblateConfig = load_config(AblateConfig, argv)
    device = resolve_device(cfg.device)
    subjects = [load_subject(cfg, "model", device)]
    if cfg.control:
        subjects.append(load_subject(cfg, "control", device))
        a, b = (s.model.config for s in subjects)
        if (a.n_layer, a.n_embed) != (b.n_layer, b.n_embed):
            raise UserError(f"control={cfg.control} has {b.n_layer} layers of {b.n_embed} units, the model "
                            f"{a.n_layer} of {a.n_embed}: the curves put the same k side by side, so both need "
                            f"the same sites and units")
    first = subjects[0]
    out = output_file(cfg.out, default_name(first.path, cfg), first.path.parent)
    png = figure_path(out)
    require_writable(out.parent)
    val_tokens = None
    if cfg.dataset:
        val_file = resolve_path(cfg.dataset, DATA_DIR) / "val.bin"
        for s in subjects:  # refused before any work
            val_tokens = open_tokens(val_file, s.model.config.block_size, s.model.config.vocab_size)
            validation_windows(s.model, val_tokens, cfg.val_batches * cfg.val_batch_size, cfg.seed)
    pairs = load_blimp_local(Path(cfg.data_dir), cfg.paradigms) if cfg.data_dir else load_blimp_hub(cfg.paradigms)
    scoring = Scoring(cfg, device, pairs, gpt2_encoding(), val_tokens)
    n_embed, n_sites = first.model.config.n_embed, first.model.config.n_sites
    print(f"ablating k={','.join(map(str, cfg.k_values()))} " + (f"of {n_embed} units at each of {n_sites} sites"
          if cfg.select == "site" else f"of the {n_sites * n_embed} units of {n_sites} sites") + f" (where={cfg.where}); "
          f"{len(pairs)} BLiMP pairs" + (f", {cfg.val_batches} x {cfg.val_batch_size} validation windows"
                                         if val_tokens is not None else ""))
    records = [sweep(s, scoring) for s in subjects]
    for s, r in zip(subjects, records):
        print_table(s, r, cfg, val_tokens is not None)
    record = {**records[0], "config": asdict(cfg), "k": cfg.k_values(), "select": cfg.select, "where": cfg.where,
              "n_pairs": len(pairs), "not_scorable": records[0]["intact"]["not_scorable"], "figure": str(png),
              "control": records[1] if cfg.control else None}
    from topolm.figures import plot_ablation, save_figure
    fig = plot_ablation([(s.title, r) for s, r in zip(subjects, records)], cfg.select, cfg.where, cfg.draws)
    with held(f"{out} and {png} were written in full"):  # a stop during the writes lets them finish
        atomic_write(out, json.dumps(record, indent=2) + "\n")
        save_figure(fig, png)
    print(f"wrote {out}")
    print(f"wrote {png}")


if __name__ == "__main__":
    cli_main(main)
