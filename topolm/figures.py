"""Figures of the analysis: t-maps on the sheet, Moran's I against its null, correlation by distance,
response profiles. Each takes `results`, a list of (loaded model, measures) pairs; a loaded model
has `name`, `title` and `label`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from topolm.analysis import CONDITIONS, contrast_names, undefined_map
from topolm.files import atomic_write

CONTRAST_LABELS = {"localizer": ("sentences - nonword lists", "S - N"), "verb_noun": ("verbs - nouns", "verbs - nouns")}


def contrast_label(m: dict, contrast: str) -> tuple[str, str]:
    """(title, short) of a contrast: the headline ones' words, else its name and sides (units.npz's contrast_labels)."""
    if contrast in CONTRAST_LABELS:
        return CONTRAST_LABELS[contrast]
    names = contrast_names(m)
    sides = str(m["contrast_labels"][names.index(contrast)]) if "contrast_labels" in m else contrast
    return f"{contrast}: {sides}", sides


# ----------------------------------------------------------------------------- output files

def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    plt.close(fig)
    return path


def json_safe(x):
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
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
    vmax = 1.0 if vmax is None else vmax  # no colour bar is drawn then: t is 0 (white) or undefined (grey)
    image = ax.imshow(_sheet_image(t, coords), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    if marked.any():
        cells = np.unique(coords[marked], axis=0)
        ax.scatter(cells[:, 1], cells[:, 0], s=dot, c="k", marker="o", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _marks(m: dict, contrast: str, q: float = 0.05) -> np.ndarray:
    if contrast == "localizer":
        return m["selective_localizer"]
    if contrast == "verb_noun":
        return m["selective_verb"] | m["selective_noun"]
    return np.nan_to_num(m[f"q_{contrast}"], nan=1.0) <= q


def _vmax(results, contrast: str, smoothed: bool = False) -> float | None:
    """The colour scale's limit: the largest |t| over every map (the smoothed readout's with `smoothed`); None
    when no unit has a defined t other than 0 (then no colour bar means anything)."""
    t = np.concatenate([np.ravel(m[f"t_{'smoothed_' if smoothed else ''}{contrast}"]) for _, m in results])
    t = np.abs(t[np.isfinite(t)])
    return float(t.max()) if len(t) and t.max() > 0 else None


def _moran_text(m: dict, s: int, contrast: str) -> str:
    """'I=0.52' for a key's Moran's I (contrast: e.g. 'localizer' or 'smoothed_localizer'), or 'I undefined'."""
    i = m[f"moran_{contrast}"][s]
    return "I undefined" if math.isnan(i) else f"I={i:.2f}"


UNDEFINED_NOTE = "grey: t undefined"


def _mark_text(contrast: str, q: float) -> str:
    if contrast == "localizer":
        return f"dots: language-selective units (S > N, FDR q < {q:g})"
    if contrast == "verb_noun":
        return f"dots: units that tell verbs from nouns (FDR q < {q:g}, either sign)"
    return f"dots: units that tell the two sides apart (FDR q < {q:g}, either sign)"


def plot_maps(results: list[tuple], contrast: str, q: float, smoothed: bool = False) -> "object":
    """Every site's t-map, n_layer columns (wrapped at 12) x (attn, mlp) rows, per model; `smoothed`: the t-maps of
    the smoothed readout (`t_smoothed_<contrast>`), without selective units (no FDR test runs on them)."""
    import matplotlib.pyplot as plt

    key = f"smoothed_{contrast}" if smoothed else contrast

    n_layer = results[0][0].model.config.n_layer
    cols = min(n_layer, 12)
    wraps = math.ceil(n_layer / cols)
    rows = 2 * wraps * len(results)
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.3 * cols + 1.4, 6.0), 1.3 * rows + 1.1), dpi=90, squeeze=False,
                             layout="constrained")
    vmax = _vmax(results, contrast, smoothed)
    image = None
    for k, (loaded, m) in enumerate(results):
        names = [str(n) for n in m["site_names"]]
        for s, name in enumerate(names):
            layer, kind = s // 2, s % 2
            row = (k * wraps + layer // cols) * 2 + kind
            ax = axes[row, layer % cols]
            marks = np.zeros(len(m["coords"][s]), bool) if smoothed else _marks(m, contrast, q)[s]
            image = _draw_map(ax, m[f"t_{key}"][s], marks, m["coords"][s], vmax, 2.0)
            ax.set_title(f"L{layer} {'attn' if kind == 0 else 'mlp'}  {_moran_text(m, s, key)}", fontsize=7, pad=2)
            if layer % cols == 0:
                ax.set_ylabel(f"{loaded.name}\nattn" if kind == 0 else "mlp", fontsize=7)
        for layer in range(n_layer, wraps * cols):
            for kind in range(2):
                axes[(k * wraps + layer // cols) * 2 + kind, layer % cols].axis("off")
    what, short = contrast_label(results[0][1], contrast)
    titles = ", below it ".join(loaded.title for loaded, _ in results)
    scale = "" if vmax is not None else "\nno colour scale: t is 0 or undefined at every unit of every map"
    if smoothed:
        fwhm = float(results[0][1]["fwhm"])
        how = (f"smoothed readout (Gaussian, FWHM {fwhm:g} grid spacings),\nWelch t per cell on the sheet of every site\n"
               f"{titles}\nI: Moran's I of the smoothed map; smoothing alone raises it: compare it\nwith its null "
               f"(positions shuffled, then smoothed; morans_i.png), never with 0")
    else:
        how = (f"Welch t per unit on the sheet of every site\n{titles}\n{_mark_text(contrast, q)}; "
               f"I: Moran's I (unsmoothed)")
    fig.suptitle(f"{what}: {how}; {UNDEFINED_NOTE}{scale}", fontsize=8)
    if vmax is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=0.7, aspect=30)
        cbar.set_label(f"t ({short})", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    return fig


def plot_site(loaded, m: dict, s: int, contrast: str, q: float, vmax: float | None):
    """One site's t-map. A map without a defined t other than 0 has no colour bar; an undefined
    Moran's I is written as such, with its reason (analysis.undefined_map)."""
    import matplotlib.pyplot as plt

    t = m[f"t_{contrast}"][s]
    fig = plt.figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_axes((0.06, 0.08, 0.72, 0.72))  # fixed rectangles: no layout engine to run per file
    image = _draw_map(ax, t, _marks(m, contrast, q)[s], m["coords"][s], vmax, 9.0)
    what, short = contrast_label(m, contrast)
    null = m[f"null_moran_{contrast}"][:, s]
    i, p = m[f"moran_{contrast}"][s], m[f"moran_p_{contrast}"][s]
    reason = undefined_map(t, m.get(f"n_items_{contrast}"), m.get(f"n_left_out_{contrast}"))
    if reason or math.isnan(i):
        moran = f"Moran's I undefined: {reason or 'the map is constant'}"
    else:
        moran = f"Moran's I {i:.3f} (p {p:.3f}); shuffled null {null.mean():.3f}"
    fig.suptitle(f"{loaded.title}\n{m['site_names'][s]}: {what}\n{moran}", fontsize=7, y=0.97, wrap=True)
    ax.set_xlabel(_mark_text(contrast, q) + (f"; {UNDEFINED_NOTE}" if np.isnan(t).any() else ""), fontsize=7)
    finite = np.abs(t[np.isfinite(t)])
    if vmax is not None and len(finite) and finite.max() > 0:
        cbar = fig.colorbar(image, cax=fig.add_axes((0.82, 0.08, 0.04, 0.72)))
        cbar.set_label(f"t ({short})", fontsize=8)
    return fig


def plot_morans(results: list[tuple]):
    import matplotlib.pyplot as plt

    contrasts = contrast_names(results[0][1])
    fig, axes = plt.subplots(1, len(contrasts), figsize=(5 * len(contrasts), 3.6), dpi=90, sharey=True, squeeze=False)
    axes = axes[0]
    colours = ["C3", "C0"]
    for ax, contrast in zip(axes, contrasts):
        for k, (loaded, m) in enumerate(results):
            x = np.arange(len(m["site_names"])) + 0.15 * k
            null = m[f"null_moran_{contrast}"]
            lo, hi = np.percentile(null, 2.5, axis=0), np.percentile(null, 97.5, axis=0)
            ax.vlines(x, lo, hi, color=colours[k], alpha=0.35, linewidth=4,
                      label=f"{loaded.name}: shuffled-position null, 95%")
            ax.plot(x, m[f"moran_{contrast}"], "o", color=colours[k], label=f"{loaded.title}")
            if f"moran_smoothed_{contrast}" in m:
                null = m[f"null_moran_smoothed_{contrast}"]
                ax.vlines(x + 0.3, np.percentile(null, 2.5, axis=0), np.percentile(null, 97.5, axis=0), color=colours[k],
                          alpha=0.15, linewidth=4, label=f"{loaded.name}: smoothed readout's null, 95%")
                ax.plot(x + 0.3, m[f"moran_smoothed_{contrast}"], "s", mfc="none", color=colours[k],
                        label=f"{loaded.name}: smoothed readout (FWHM {float(m['fwhm']):g})")
        names = [str(n).replace("layer.", "L") for n in results[0][1]["site_names"]]
        ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_title(f"{contrast_label(results[0][1], contrast)[0]}", fontsize=9)
    smoothed = any(f"moran_smoothed_{contrasts[0]}" in m for _, m in results)
    axes[0].set_ylabel("Moran's I of the t-map" + (" (squares: smoothed)" if smoothed else " (unsmoothed)"))
    axes[-1].legend(fontsize=6 if smoothed else 7, loc="best")
    fig.suptitle("Spatial autocorrelation of every site's t-map (queen contiguity, row-standardised)", fontsize=9)
    fig.tight_layout()
    return fig


def readout_figures(results: list[tuple], q: float, out: Path) -> list[Path]:
    """The smoothed readout's t-maps, `<contrast>_maps_smoothed.png` in `out`, where it was measured (fwhm > 0)."""
    contrasts = contrast_names(results[0][1])
    if f"t_smoothed_{contrasts[0]}" not in results[0][1]:
        return []
    return [save_figure(plot_maps(results, contrast, q, smoothed=True), out / f"{contrast}_maps_smoothed.png")
            for contrast in contrasts]


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


def plot_correlation(results: list[tuple]):
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


def plot_profile(results: list[tuple]):
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


