"""Running the analysis of analyze.py (and reproduce.py) on one or two models: the stimuli and held-out text
read, the models loaded, every measure (topolm.analysis.measure_model, topolm.clusters), the console table, and
the output files (units.npz, the figures, summary.json) written through a staging folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from topolm.analysis import (StatisticsKeys, Stimuli, contrast_names, count_keys, defined_mean, heldout_text, heldout_windows, measure_model,
                             option_lines, summarize)
from topolm.checkpoint import load_model, require_gpt2_tokenizer, require_positions
from topolm.clusters import ClusterKeys
from topolm.config import DATA_DIR, SeedKey, UserError, require, resolve_path
from topolm.files import atomic_write, commit_staged, discard_staged, read_text, staging_folder
from topolm.provenance import provenance
from topolm.signals import held
from topolm.tokenizer import gpt2_encoding
from model import GPT
from topolm.figures import (_vmax, json_safe, plot_clusters, plot_correlation, plot_maps, plot_morans, plot_profile,
                            plot_site, readout_figures, save_figure)
from topolm.stimuli import STIMULI_DIR
from topolm.stimsets import read_sets, select_contrasts

DEFAULT_STIMULI = "stimuli"


@dataclass
class AnalysisKeys(StatisticsKeys, ClusterKeys, SeedKey):
    """The keys of what the analysis measures and how (analyze.py's and reproduce.py's): its own below, seed from
    topolm.config.SeedKey, the statistics' choices (fwhm, fdr, moran, profile) from topolm.analysis.StatisticsKeys,
    the clusters' settings (seed_threshold, grow_threshold, min_size) from topolm.clusters.ClusterKeys."""
    stimuli: str = DEFAULT_STIMULI
    """Stimulus sets, comma-separated: files (this project's set format or a research layout, told apart by the
    header; docs/analysis.md) or folders (their localizer.tsv, pos.tsv and other *.tsv / *.csv); paths are
    relative to the current folder; 'stimuli' is the repository's shipped stimuli/ wherever the command runs.
    The localizer is always measured: the shipped one unless a set given is a localizer."""
    contrasts: str = ""
    """Contrasts to run, comma-separated: names the sets declare (e.g. S_J, concrete_noun_verb), SIDE-SIDE
    expressions (groups, factor=level&factor=level conjunctions or levels of one set, e.g. noun-verb), or
    'all'; empty: the headline ones, localizer (S - N) and verb_noun (verb - noun) where declared. S - N
    (`localizer`) is always run."""
    heldout: str = ""
    """Held-out text for the correlations and the spatial loss: a uint16 token file (.bin) or a UTF-8 text
    file; empty: val.bin of the text the model was trained on (the checkpoint's `data`: a finetuned
    model's is its backbone's), else the localizer's sentences. Printed, and kept in summary.json."""
    heldout_tokens: int = 8192
    """Held-out tokens to measure correlations on (fewer if the text is shorter)."""
    q: float = 0.05
    """False discovery rate for selective units (Benjamini-Hochberg, per site or pooled: `fdr`)."""
    permutations: int = 999
    """Permutations for each Moran's I p-value."""
    null_shuffles: int = 100
    """Shuffles of the unit positions for the null of Moran's I, smoothed (`fwhm`) or not (the correlation null
    uses the first 10)."""
    batch_size: int = 32
    """Stimuli per forward pass."""
    seed: int = 0
    """Seed of the permutations, the shuffles and the held-out windows (default 0: the documented figures' draws)."""

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.q < 1, f"q={self.q} must be in (0, 1)")
        require(self.permutations >= 0, f"permutations={self.permutations} must be >= 0")
        require(self.null_shuffles >= 2, f"null_shuffles={self.null_shuffles} must be >= 2")
        require(self.heldout_tokens >= 16, f"heldout_tokens={self.heldout_tokens} must be >= 16")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")



# ----------------------------------------------------------------------------- inputs

def heldout_tokens(cfg: AnalysisKeys, ckpt: dict, localizer: dict[str, list[str]]) -> tuple[np.ndarray, str, str]:
    """The held-out token ids of `cfg.heldout` (topolm.analysis.heldout_text: that file, else the
    checkpoint's val.bin, else the localizer's sentences), their source and why that source."""
    return heldout_text(cfg.heldout, ckpt, localizer)


@dataclass
class Loaded:
    label: str  # "model" or "compare"
    model: GPT
    ckpt: dict
    path: Path
    windows: np.ndarray
    heldout_source: str
    heldout_chosen_by: str  # "heldout=", "the checkpoint's data (<dataset>)" or "the fallback"
    provenance: dict  # topolm.provenance: checkpoint, step, weights digest, code version

    @property
    def name(self) -> str:
        """The run folder's name for a checkpoint file, the folder's own for a Hugging Face folder."""
        return self.path.name if self.path.is_dir() else self.path.parent.name

    @property
    def step(self) -> int:
        return int(self.ckpt.get("iter_num", -1))

    @property
    def title(self) -> str:
        return f"{self.name} (step {self.step})"


def load(cfg: AnalysisKeys, device: str, label: str, arg: str, localizer) -> Loaded:
    model, ckpt, path = load_model(arg, device)
    require_positions(ckpt, path, "the analysis")
    require_gpt2_tokenizer(ckpt, path, "the analysis's stimuli")
    tokens, source, chosen_by = heldout_tokens(cfg, ckpt, localizer)
    if len(tokens) < 16:
        raise UserError(f"held-out text {source} has only {len(tokens)} tokens")
    if int(tokens.max()) >= model.config.vocab_size:
        raise UserError(f"held-out text {source} holds token id {int(tokens.max())} >= vocab_size={model.config.vocab_size}")
    print(f"{label} {path}: held-out text {source} (from {chosen_by})")
    seq_len = min(model.config.block_size - 1, 256)
    return Loaded(label, model, ckpt, path, heldout_windows(tokens, cfg.heldout_tokens, seq_len, cfg.seed), source,
                  chosen_by, provenance(path, ckpt, model))


def fit_stimuli(stim: Stimuli, models: list[Loaded]) -> tuple[Stimuli, dict]:
    """The stimuli every analysed model reads whole (`Stimuli.fitting` at the smallest block_size, so that
    a compared model is measured on the same items), and the counts left out; printed when any is."""
    block_size = min(loaded.model.config.block_size for loaded in models)
    kept, counts = stim.fitting(block_size)
    left, too_long = counts["left_out"], counts["too_long"]
    if any(left.values()):
        n, n_kept = _localizer_items(stim), _localizer_items(kept)
        others = [f"{len({it.sample for it in s.items})} of {len({it.sample for it in f.items})} "
                  f"{'nouns and verbs' if s.name == 'pos' else f'samples of {s.name}'}"
                  for s, f in zip(kept.sets[1:], stim.sets[1:])]
        print(f"block_size={block_size}: items longer than {block_size - 1} tokens (+1 prefix) are left out with their "
              f"matched items (too long: {', '.join(f'{c} {v}' for c, v in too_long.items())}); left out: "
              f"{', '.join(f'{c} {v}' for c, v in left.items())}; analysed: {n_kept} of {n} localizer items "
              f"per condition" + "".join(f", {x}" for x in others))
    return kept, counts


# ----------------------------------------------------------------------------- console

def _num(x: float, width: int) -> str:
    """A number for the table; an undefined one (NaN) as 'undef'."""
    return f"{'undef':>{width}}" if x is None or x != x else f"{x:>{width}.3f}"


SHORT = {"localizer": "S-N", "verb_noun": "V-N"}  # the console's names of the headline contrasts


def print_table(loaded: Loaded, summary: dict) -> None:
    contrasts = list(summary["contrasts"])
    short = [SHORT.get(c, c) for c in contrasts]
    widths = [max(7, len(x) + 3) for x in short]
    print(f"\n{loaded.title}  {loaded.path}")
    print(f"{'site':<14}" + "".join(f"{'I ' + x:>{w}}{'p':>7}" for x, w in zip(short, widths)) +
          f"{'null I':>8}{'sel%':>6}{'adj r':>7}{'far r':>7}{'null r':>7}{'SL':>6}")
    for name, e in list(summary["sites"].items()) + [("mean", summary["mean"])]:
        cells = "".join(f"{_num(e[c]['morans_i'], w)}{_num(e[c]['p'], 7) if name != 'mean' else '':>7}"  # no p of a mean
                        for c, w in zip(contrasts, widths))
        print(f"{name:<14}{cells}{_num(defined_mean([e[c]['null_i'] for c in contrasts]), 8)}"
              f"{100 * e['fraction_selective']:>6.1f}{_num(e['adjacent_corr'], 7)}{_num(e['far_corr'], 7)}"
              f"{_num(e['null_adjacent_corr'], 7)}{_num(e['spatial_loss'], 6)}")
    m = summary["mean"]
    print("null 95% band of the site-mean I: " + ", ".join(
        f"{x} [{_num(m[c]['null_i_95'][0], 0)}, {_num(m[c]['null_i_95'][1], 0)}]" for c, x in zip(contrasts, short)))
    for name, e in summary["sites"].items():
        for contrast in contrasts:
            if "undefined" in e[contrast]:
                print(f"{name} {contrast}: Moran's I undefined: {e[contrast]['undefined']}")
    for line in option_lines(summary):
        print(line)
    print("clusters of the localizer t-map (cells; + positive, - negative): " + "; ".join(
        f"{name} +{e['clusters']['positive_sizes']} -{e['clusters']['negative_sizes']}"
        for name, e in summary["sites"].items()))


# ----------------------------------------------------------------------------- main

def _localizer_items(stim: Stimuli) -> int:
    """Items per condition of the localizer (item k of every condition is matched)."""
    return len({it.match for it in stim.localizer.items})


def _set_summary(full, kept) -> dict:
    """One set's entry of summary.json's `stimuli.sets`: its file, samples per label level as read and analysed."""
    counts, prefix = {}, f"{full.name}:"
    for key, rows in count_keys(full).items():
        counts[key.removeprefix(prefix)] = {"in_file": len({full.items[k].sample for k in rows})}
    for key, rows in count_keys(kept).items():
        counts[key.removeprefix(prefix)]["analysed"] = len({kept.items[k].sample for k in rows})
    for entry in counts.values():
        entry.setdefault("analysed", 0)
    return {"source": full.source, "items_in_file": len(full.items), "samples_in_file": len({i.sample for i in full.items}),
            "samples_analysed": len({i.sample for i in kept.items}), "per_label": counts,
            "contrasts": {n: f"{a} - {b}" for n, (a, b) in full.contrasts.items()}}


def stimuli_summary(full: Stimuli, kept: Stimuli, fit: dict) -> dict:
    """summary.json's `stimuli`: what was analysed (localizer items per condition; with the shipped pos set its
    nouns, verbs and frames; every set under `sets`), the contrasts run and what was left out."""
    summary = {"localizer_items_per_condition": _localizer_items(kept),
               "localizer_items_in_file": _localizer_items(full)}
    for s, k in zip(full.sets, kept.sets):
        if s.name == "pos":
            for cls, key in (("noun", "nouns"), ("verb", "verbs")):
                summary[key] = len({it.sample for it in k.items if it.labels["class"] == cls})
            summary["frames"] = len(s.items) // max(1, len({it.sample for it in s.items}))
    summary["sets"] = {s.name: _set_summary(s, k) for s, k in zip(full.sets, kept.sets)}
    summary["contrasts"] = {c.name: {"set": c.set_name, "sides": c.label} for c in full.contrasts}
    summary["left_out"] = {"block_size": fit["block_size"], "per_condition": fit["left_out"], "too_long": fit["too_long"],
                           "reason": "longer than block_size - 1 tokens (the item and its <|endoftext|> prefix), or "
                                     "matched to an item that is (localizer items leave every condition, words leave "
                                     "with all their frames)"}
    return summary


def read_stimuli(cfg: AnalysisKeys) -> tuple[Stimuli, dict[str, list[str]]]:
    """The sets of `stimuli`, the contrasts of `contrasts`, tokenized; and the localizer's texts per condition.
    Raises UserError naming the key for a set or contrast that cannot be read."""
    try:
        sets = read_sets(cfg.stimuli, Path("."), STIMULI_DIR)
    except (OSError, ValueError) as e:
        raise UserError(f"stimuli={cfg.stimuli}: {e}") from e
    try:
        contrasts = select_contrasts(sets, cfg.contrasts)
    except ValueError as e:
        raise UserError(f"{e}" if str(e).startswith("contrasts=") else f"contrasts={cfg.contrasts}: {e}") from e
    try:
        full = Stimuli.build(sets, contrasts, gpt2_encoding())
    except ValueError as e:
        raise UserError(f"stimuli={cfg.stimuli}: {e}") from e
    localizer: dict[str, list[str]] = {}
    for item in sets[0].items:
        localizer.setdefault(item.labels["condition"], []).append(item.text)
    return full, localizer


def measure_all(cfg: AnalysisKeys, models: list[Loaded], stim: Stimuli, read: tuple) -> tuple[list, dict]:
    """Every model's measures (topolm.analysis.measure_model) on the stimuli that fit every model (`stim`)
    and the summary that summary.json holds; `read`: every item as read (`Stimuli`) and what was left out
    (`fit_stimuli`)."""
    from tqdm import tqdm

    full, fit = read
    torch.manual_seed(cfg.seed)
    results = []
    for loaded in models:
        with tqdm(total=stim.n_items, desc=f"stimuli ({loaded.name})", unit="item") as bar:
            m = measure_model(loaded.model, stim, loaded.windows, q=cfg.q, permutations=cfg.permutations,
                              null_shuffles=cfg.null_shuffles, seed=cfg.seed, batch_size=cfg.batch_size, progress=bar,
                              stats=cfg, clusters=cfg)
        results.append((loaded, m))
    summary = {"analysis": {k: v for k, v in asdict(cfg).items()},
               "stimuli": stimuli_summary(full, stim, fit)}
    for loaded, m in results:
        summary[loaded.label] = {"name": loaded.name, "checkpoint": str(loaded.path), "step": loaded.step,
                                 "provenance": loaded.provenance,
                                 "n_layer": loaded.model.config.n_layer, "n_embed": loaded.model.config.n_embed,
                                 "sheet": list(loaded.model.config.sheet),
                                 "with_resid": loaded.model.config.with_resid, "alpha": loaded.model.config.alpha,
                                 "alpha_sites": loaded.model.config.site_alpha,
                                 "heldout": {"source": loaded.heldout_source, "from": loaded.heldout_chosen_by,
                                             "tokens": int(m["heldout_samples"])},
                                 **summarize(m)}
    return results, summary


def write_staged(results: list, summary: dict, q: float, out: Path) -> list[Path]:
    """Every output file, drawn into a staging folder and moved into `out` at the end: a stop (or an error)
    before that leaves `out` as it was, never part of a new analysis beside part of an old one. Returns
    the files' paths (in the staging folder)."""
    import matplotlib
    matplotlib.use("Agg")

    stage = staging_folder(out)
    try:
        written = write_outputs(results, summary, q, stage)
        with held(f"{out} holds the complete analysis"):
            commit_staged(stage, out)
    finally:
        discard_staged(stage)
    return written


def write_outputs(results: list, summary: dict, q: float, out: Path) -> list[Path]:
    """units.npz (compare_units.npz), the figures and summary.json of the analysed models into `out`."""
    written = []
    for loaded, m in results:
        npz = out / ("units.npz" if loaded.label == "model" else "compare_units.npz")
        arrays = {**m, "provenance": np.array(json.dumps(loaded.provenance))}  # a string: loads without pickle
        atomic_write(npz, lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
        written.append(npz)
    for contrast in contrast_names(results[0][1]):
        written.append(save_figure(plot_maps(results, contrast, q), out / f"{contrast}_maps.png"))
        vmax = _vmax(results, contrast)
        for loaded, m in results:
            for s, name in enumerate(m["site_names"]):
                written.append(save_figure(plot_site(loaded, m, s, contrast, q, vmax),
                                           out / "sites" / loaded.label / contrast / f"{name}.png"))
    written += readout_figures(results, q, out)
    written.append(save_figure(plot_morans(results), out / "morans_i.png"))
    written.append(save_figure(plot_correlation(results), out / "correlation_vs_distance.png"))
    written.append(save_figure(plot_profile(results), out / "response_profile.png"))
    written.append(save_figure(plot_clusters(results), out / "clusters.png"))
    atomic_write(out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
    written.append(out / "summary.json")
    return written
