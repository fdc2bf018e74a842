"""Measure and draw the topography of a trained model (SPEC section 9).

    python analyze.py ckpt=out/<run> out=figures/<name>
    python analyze.py ckpt=out/<run> compare=out/<control run> out=figures/<name>

`ckpt` (and `compare`) is a checkpoint file or a run folder (its newest checkpoint). Writes into
`out` (default figures/<run folder name>):
- localizer_maps.png, verb_noun_maps.png: the t-map of every site (S vs N; verbs vs nouns) on its
  sheet, selective units marked, for the model and, below it, the compared model;
- sites/<model|compare>/<contrast>/<site>.png: the same, one site per file, larger;
- morans_i.png: Moran's I of every site's t-maps with the 95% band of its shuffled-position null;
- correlation_vs_distance.png: mean correlation of unit pairs by grid distance on held-out text,
  beside the same curve with unit positions shuffled;
- response_profile.png: mean response of the language-selective units to S, W, J and N
  (cross-validated: selected on odd items, measured on even ones and vice versa);
- summary.json (per site and averaged), units.npz (and compare_units.npz): per-unit arrays.
All keys are fields of `AnalyzeConfig`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from analysis import CONDITIONS, CONTRASTS, Stimuli, heldout_windows, measure_model, summarize
from checkpoint import load_model, require_gpt2_tokenizer
from common import (DATA_DIR, REPO, UserError, atomic_write, check_seed, cli_main, require_device, gpt2_encoding, load_config, require,
                    resolve_path)
from model import GPT
from stimuli import read_localizer, read_pos

CONTRAST_LABELS = {"localizer": ("sentences - nonword lists", "S - N"), "verb_noun": ("verbs - nouns", "verbs - nouns")}


@dataclass
class AnalyzeConfig:
    ckpt: str = ""
    """Checkpoint file, or run folder whose newest checkpoint is analysed."""
    compare: str = ""
    """Optional second model (e.g. the alpha=0 control), analysed the same way and drawn below the first."""
    out: str = ""
    """Output folder; empty: figures/<run folder name of ckpt>."""
    overwrite: bool = False
    """Write into an output folder that already holds a summary.json."""
    stimuli: str = "stimuli"
    """Folder with localizer.tsv and pos.tsv (stimuli/generate.py writes them)."""
    heldout: str = ""
    """Held-out text for the correlations and the spatial loss: a uint16 token file (.bin) or a UTF-8 text
    file; empty: val.bin of the model's training dataset, else the localizer's sentences."""
    heldout_tokens: int = 8192
    """Held-out tokens to measure correlations on (fewer if the text is shorter)."""
    q: float = 0.05
    """False discovery rate for selective units (Benjamini-Hochberg, per site)."""
    permutations: int = 999
    """Permutations for each Moran's I p-value."""
    null_shuffles: int = 100
    """Shuffles of the unit positions for the null of Moran's I (the correlation null uses the first 10)."""
    batch_size: int = 32
    """Stimuli per forward pass."""
    seed: int = 0
    """Seed of the permutations, the shuffles and the held-out windows."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'mps'."""

    def __post_init__(self):
        require(0 < self.q < 1, f"q={self.q} must be in (0, 1)")
        require(self.permutations >= 0, f"permutations={self.permutations} must be >= 0")
        require(self.null_shuffles >= 2, f"null_shuffles={self.null_shuffles} must be >= 2")
        require(self.heldout_tokens >= 16, f"heldout_tokens={self.heldout_tokens} must be >= 16")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check_seed(self.seed)
        require(self.device in ("cpu", "cuda", "mps") or self.device.startswith("cuda:"),
                f"device must be cpu, cuda, cuda:N or mps; got '{self.device}'")


# ----------------------------------------------------------------------------- inputs

def heldout_tokens(cfg: AnalyzeConfig, ckpt: dict, localizer: dict[str, list[str]]) -> tuple[np.ndarray, str]:
    """The held-out token ids and a description of where they came from."""
    enc = gpt2_encoding()
    if cfg.heldout:
        path = Path(cfg.heldout)
        if not path.is_file():
            raise UserError(f"heldout file not found: {path}")
        if path.suffix == ".bin":
            if path.stat().st_size % 2:
                raise UserError(f"heldout={path} is not a uint16 token file (odd size)")
            return np.fromfile(path, dtype=np.uint16), str(path)
        return np.array(enc.encode_ordinary(path.read_text(encoding="utf-8")), dtype=np.int64), str(path)
    dataset = (ckpt.get("config") or {}).get("dataset")
    if dataset:
        val = resolve_path(str(dataset), DATA_DIR) / "val.bin"
        if val.is_file() and val.stat().st_size >= 64:
            return np.memmap(val, dtype=np.uint16, mode="r"), str(val)
    text = " ".join(localizer["S"])
    return np.array(enc.encode_ordinary(text), dtype=np.int64), "the localizer's sentences (no val.bin found)"


@dataclass
class Loaded:
    label: str  # "model" or "compare"
    model: GPT
    ckpt: dict
    path: Path
    windows: np.ndarray
    heldout_source: str

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def step(self) -> int:
        return int(self.ckpt.get("iter_num", -1))

    @property
    def title(self) -> str:
        return f"{self.name} (step {self.step})"


def load(cfg: AnalyzeConfig, label: str, arg: str, stim: Stimuli, localizer) -> Loaded:
    model, ckpt, path = load_model(arg, cfg.device)
    require_gpt2_tokenizer(ckpt, path, "the analysis's stimuli")
    if stim.longest + 1 > model.config.block_size:
        raise UserError(f"{path}: the longest stimulus has {stim.longest} tokens (+1 prefix), more than "
                        f"block_size={model.config.block_size}; analyse a model with block_size >= {stim.longest + 1}, "
                        f"or pass shorter stimuli with stimuli=<folder>")
    tokens, source = heldout_tokens(cfg, ckpt, localizer)
    if len(tokens) < 16:
        raise UserError(f"held-out text {source} has only {len(tokens)} tokens")
    if int(tokens.max()) >= model.config.vocab_size:
        raise UserError(f"held-out text {source} holds token id {int(tokens.max())} >= vocab_size={model.config.vocab_size}")
    seq_len = min(model.config.block_size - 1, 256)
    return Loaded(label, model, ckpt, path, heldout_windows(tokens, cfg.heldout_tokens, seq_len, cfg.seed), source)


# ----------------------------------------------------------------------------- output files

def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    plt.close(fig)
    return path


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ----------------------------------------------------------------------------- figures

def _sheet_image(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Per-cell mean of unit values on the grid spanned by the coordinates; NaN where no unit sits."""
    size = coords.max(axis=0) + 1
    total = np.zeros(size)
    count = np.zeros(size)
    np.add.at(total, (coords[:, 0], coords[:, 1]), values)
    np.add.at(count, (coords[:, 0], coords[:, 1]), 1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _draw_map(ax, t: np.ndarray, marked: np.ndarray, coords: np.ndarray, vmax: float, dot: float):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.8")
    image = ax.imshow(_sheet_image(t, coords), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    if marked.any():
        cells = np.unique(coords[marked], axis=0)
        ax.scatter(cells[:, 1], cells[:, 0], s=dot, c="k", marker="o", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _marks(m: dict, contrast: str) -> np.ndarray:
    if contrast == "localizer":
        return m["selective_localizer"]
    return m["selective_verb"] | m["selective_noun"]


def _vmax(results, contrast: str) -> float:
    top = max(float(np.nanmax(np.abs(m[f"t_{contrast}"]))) for _, m in results)
    return top if top > 0 else 1.0


def _mark_text(contrast: str, q: float) -> str:
    if contrast == "localizer":
        return f"dots: language-selective units (S > N, FDR q < {q:g})"
    return f"dots: units that tell verbs from nouns (FDR q < {q:g}, either sign)"


def plot_maps(results: list[tuple[Loaded, dict]], contrast: str, q: float) -> "object":
    """Every site's t-map, n_layer columns (wrapped at 12) x (attn, mlp) rows, per model."""
    import matplotlib.pyplot as plt

    n_layer = results[0][0].model.config.n_layer
    cols = min(n_layer, 12)
    wraps = math.ceil(n_layer / cols)
    rows = 2 * wraps * len(results)
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.3 * cols + 1.4, 6.0), 1.3 * rows + 1.1), dpi=90, squeeze=False,
                             layout="constrained")
    vmax = _vmax(results, contrast)
    image = None
    for k, (loaded, m) in enumerate(results):
        names = [str(n) for n in m["site_names"]]
        for s, name in enumerate(names):
            layer, kind = s // 2, s % 2
            row = (k * wraps + layer // cols) * 2 + kind
            ax = axes[row, layer % cols]
            image = _draw_map(ax, m[f"t_{contrast}"][s], _marks(m, contrast)[s], m["coords"][s], vmax, 2.0)
            ax.set_title(f"L{layer} {'attn' if kind == 0 else 'mlp'}  I={m[f'moran_{contrast}'][s]:.2f}", fontsize=7,
                         pad=2)
            if layer % cols == 0:
                ax.set_ylabel(f"{loaded.name}\nattn" if kind == 0 else "mlp", fontsize=7)
        for layer in range(n_layer, wraps * cols):
            for kind in range(2):
                axes[(k * wraps + layer // cols) * 2 + kind, layer % cols].axis("off")
    what, short = CONTRAST_LABELS[contrast]
    titles = ", below it ".join(loaded.title for loaded, _ in results)
    fig.suptitle(f"{what}: Welch t per unit on the sheet of every site\n{titles}\n{_mark_text(contrast, q)}; "
                 f"I: Moran's I (unsmoothed)", fontsize=8)
    cbar = fig.colorbar(image, ax=axes, shrink=0.7, aspect=30)
    cbar.set_label(f"t ({short})", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return fig


def plot_site(loaded: Loaded, m: dict, s: int, contrast: str, q: float, vmax: float):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_axes((0.06, 0.08, 0.72, 0.72))  # fixed rectangles: no layout engine to run per file
    cax = fig.add_axes((0.82, 0.08, 0.04, 0.72))
    image = _draw_map(ax, m[f"t_{contrast}"][s], _marks(m, contrast)[s], m["coords"][s], vmax, 9.0)
    what, short = CONTRAST_LABELS[contrast]
    null = m[f"null_moran_{contrast}"][:, s]
    fig.suptitle(f"{loaded.title}\n{m['site_names'][s]}: {what}\nMoran's I {m[f'moran_{contrast}'][s]:.3f} "
                 f"(p {m[f'moran_p_{contrast}'][s]:.3f}); shuffled null {null.mean():.3f}", fontsize=8, y=0.97)
    ax.set_xlabel(_mark_text(contrast, q), fontsize=7)
    cbar = fig.colorbar(image, cax=cax)
    cbar.set_label(f"t ({short})", fontsize=8)
    return fig


def plot_morans(results: list[tuple[Loaded, dict]]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90, sharey=True)
    colours = ["C3", "C0"]
    for ax, contrast in zip(axes, CONTRASTS):
        for k, (loaded, m) in enumerate(results):
            x = np.arange(len(m["site_names"])) + 0.15 * k
            null = m[f"null_moran_{contrast}"]
            lo, hi = np.percentile(null, 2.5, axis=0), np.percentile(null, 97.5, axis=0)
            ax.vlines(x, lo, hi, color=colours[k], alpha=0.35, linewidth=4,
                      label=f"{loaded.name}: shuffled-position null, 95%")
            ax.plot(x, m[f"moran_{contrast}"], "o", color=colours[k], label=f"{loaded.title}")
        names = [str(n).replace("layer.", "L") for n in results[0][1]["site_names"]]
        ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_title(f"{CONTRAST_LABELS[contrast][0]}", fontsize=9)
    axes[0].set_ylabel("Moran's I of the t-map (unsmoothed)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Spatial autocorrelation of every site's t-map (queen contiguity, row-standardised)", fontsize=9)
    fig.tight_layout()
    return fig


def _site_grid(n_sites: int, width: float, height: float):
    import matplotlib.pyplot as plt

    n_layer = n_sites // 2
    cols = min(n_layer, 8)
    wraps = math.ceil(n_layer / cols)
    fig, axes = plt.subplots(2 * wraps, cols, figsize=(width * cols + 0.8, height * 2 * wraps + 1.0), dpi=90,
                             squeeze=False)
    for layer in range(n_layer, wraps * cols):
        for kind in range(2):
            axes[(layer // cols) * 2 + kind, layer % cols].axis("off")
    return fig, [axes[(s // 2 // cols) * 2 + s % 2, (s // 2) % cols] for s in range(n_sites)]


def plot_correlation(results: list[tuple[Loaded, dict]]):
    fig, axes = _site_grid(len(results[0][1]["site_names"]), 2.3, 1.9)
    colours = ["C3", "C0"]
    for k, (loaded, m) in enumerate(results):
        x = m["corr_centres"]
        for s, ax in enumerate(axes):
            ax.plot(x, m["corr_curve"][s], "-o", color=colours[k], markersize=2, linewidth=1.2,
                    label=loaded.title if s == 0 else None)
            ax.plot(x, m["null_corr_curve"][s], "--", color=colours[k], alpha=0.6, linewidth=1,
                    label=f"{loaded.name}, positions shuffled" if s == 0 else None)
            ax.set_title(str(m["site_names"][s]), fontsize=8)
            ax.tick_params(labelsize=6)
            ax.axhline(0, color="0.6", linewidth=0.6)
    for ax in axes[-2:]:
        ax.set_xlabel("grid distance", fontsize=7)
    axes[0].set_ylabel("mean correlation", fontsize=7)
    fig.legend(fontsize=7, loc="lower center", ncol=4)
    fig.suptitle("Correlation of unit responses on held-out text, by distance on the sheet", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def plot_profile(results: list[tuple[Loaded, dict]]):
    fig, axes = _site_grid(len(results[0][1]["site_names"]), 2.1, 1.8)
    colours = ["C3", "C0"]
    width = 0.8 / len(results)
    for k, (loaded, m) in enumerate(results):
        for s, ax in enumerate(axes):
            x = np.arange(len(CONDITIONS)) + (k - (len(results) - 1) / 2) * width
            n_sel = m["profile_n_selected"][s]
            ax.bar(x, m["profile_mean"][s], width, yerr=m["profile_sem"][s], color=colours[k], alpha=0.8,
                   error_kw={"linewidth": 0.8}, label=loaded.title if s == 0 else None)
            ax.set_xticks(np.arange(len(CONDITIONS)), CONDITIONS, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_title(f"{m['site_names'][s]}  n={n_sel[0]}/{n_sel[1]}" if k == 0 else ax.get_title() +
                         f", {n_sel[0]}/{n_sel[1]}", fontsize=7)
            ax.axhline(0, color="0.6", linewidth=0.6)
    axes[0].set_ylabel("mean response", fontsize=7)
    fig.legend(fontsize=7, loc="lower center", ncol=2)
    fig.suptitle("Language-selective units (S > N): mean response to sentences, word lists, jabberwocky, nonwords\n"
                 "selected on odd items, measured on even ones and vice versa; n = units selected per fold; "
                 "bars: s.e.m. over items", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.92))
    return fig


# ----------------------------------------------------------------------------- console

def print_table(loaded: Loaded, summary: dict) -> None:
    print(f"\n{loaded.title}  {loaded.path}")
    print(f"{'site':<14}{'I S-N':>7}{'p':>7}{'I V-N':>7}{'p':>7}{'null I':>8}{'sel%':>6}{'adj r':>7}{'far r':>7}"
          f"{'null r':>7}{'SL':>6}")
    rows = list(summary["sites"].items()) + [("mean", None)]
    for name, e in rows:
        if e is None:
            e = summary["mean"]
            loc, vn = e["localizer"], e["verb_noun"]
            print(f"{'mean':<14}{loc['morans_i']:>7.3f}{'':>7}{vn['morans_i']:>7.3f}{'':>7}"
                  f"{(loc['null_i'] + vn['null_i']) / 2:>8.3f}{100 * e['fraction_selective']:>6.1f}"
                  f"{e['adjacent_corr']:>7.3f}{e['far_corr']:>7.3f}{e['null_adjacent_corr']:>7.3f}{e['spatial_loss']:>6.3f}")
            continue
        loc, vn = e["localizer"], e["verb_noun"]
        print(f"{name:<14}{loc['morans_i']:>7.3f}{loc['p']:>7.3f}{vn['morans_i']:>7.3f}{vn['p']:>7.3f}"
              f"{(loc['null_i'] + vn['null_i']) / 2:>8.3f}{100 * e['fraction_selective']:>6.1f}"
              f"{e['adjacent_corr']:>7.3f}{e['far_corr']:>7.3f}{e['null_adjacent_corr']:>7.3f}{e['spatial_loss']:>6.3f}")
    m = summary["mean"]
    print(f"null 95% band of the site-mean I: S-N [{m['localizer']['null_i_95'][0]:.3f}, {m['localizer']['null_i_95'][1]:.3f}]"
          f", V-N [{m['verb_noun']['null_i_95'][0]:.3f}, {m['verb_noun']['null_i_95'][1]:.3f}]")


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> None:
    cfg: AnalyzeConfig = load_config(AnalyzeConfig, argv)
    if not cfg.ckpt:
        raise UserError("ckpt is required: ckpt=out/<run> (a run folder or a checkpoint file)")
    require_device(cfg.device)
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but no MPS device is available")
    folder = Path(cfg.stimuli) if Path(cfg.stimuli).is_absolute() else REPO / cfg.stimuli
    try:
        localizer, pos_rows = read_localizer(folder), read_pos(folder)
        stim = Stimuli.build(localizer, pos_rows, gpt2_encoding())
    except (OSError, ValueError) as e:
        raise UserError(f"stimuli={cfg.stimuli}: {e}") from e
    models = [load(cfg, "model", cfg.ckpt, stim, localizer)]
    if cfg.compare:
        models.append(load(cfg, "compare", cfg.compare, stim, localizer))
    out = Path(cfg.out) if cfg.out else REPO / "figures" / models[0].name
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds an analysis (summary.json); choose another out= or set overwrite=true")

    from tqdm import tqdm

    import matplotlib
    matplotlib.use("Agg")

    start = time.time()
    torch.manual_seed(cfg.seed)
    results = []
    for loaded in models:
        with tqdm(total=stim.n_items, desc=f"stimuli ({loaded.name})", unit="item") as bar:
            m = measure_model(loaded.model, stim, loaded.windows, q=cfg.q, permutations=cfg.permutations,
                              null_shuffles=cfg.null_shuffles, seed=cfg.seed, batch_size=cfg.batch_size, progress=bar)
        results.append((loaded, m))

    written = []
    summary = {"analysis": {k: v for k, v in asdict(cfg).items()},
               "stimuli": {"localizer_items_per_condition": len(localizer["S"]),
                           "nouns": int(len(set(stim.pos_word[stim.pos_category == "noun"]))),
                           "verbs": int(len(set(stim.pos_word[stim.pos_category == "verb"]))),
                           "frames": int(len(pos_rows) // len(set(stim.pos_word)))}}
    for loaded, m in results:
        summary[loaded.label] = {"name": loaded.name, "checkpoint": str(loaded.path), "step": loaded.step,
                                 "n_layer": loaded.model.config.n_layer, "n_embed": loaded.model.config.n_embed,
                                 "with_resid": loaded.model.config.with_resid, "alpha": loaded.model.config.alpha,
                                 "heldout": {"source": loaded.heldout_source, "tokens": int(m["heldout_samples"])},
                                 **summarize(m)}
        npz = out / ("units.npz" if loaded.label == "model" else "compare_units.npz")
        atomic_write(npz, lambda f, m=m: np.savez_compressed(f, **m))
        written.append(npz)
    for contrast in CONTRASTS:
        written.append(save_figure(plot_maps(results, contrast, cfg.q), out / f"{contrast}_maps.png"))
        vmax = _vmax(results, contrast)
        for loaded, m in results:
            for s, name in enumerate(m["site_names"]):
                written.append(save_figure(plot_site(loaded, m, s, contrast, cfg.q, vmax),
                                           out / "sites" / loaded.label / contrast / f"{name}.png"))
    written.append(save_figure(plot_morans(results), out / "morans_i.png"))
    written.append(save_figure(plot_correlation(results), out / "correlation_vs_distance.png"))
    written.append(save_figure(plot_profile(results), out / "response_profile.png"))
    atomic_write(out / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")

    for loaded, _ in results:
        print_table(loaded, summary[loaded.label])
    print(f"\n{len(written) + 1} files in {out} ({time.time() - start:.0f} s): summary.json, units.npz, "
          f"{', '.join(f'{c}_maps.png' for c in CONTRASTS)}, morans_i.png, correlation_vs_distance.png, "
          f"response_profile.png, sites/")
    print(f"maps: {out / 'localizer_maps.png'}")


if __name__ == "__main__":
    cli_main(main)
