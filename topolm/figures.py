"""Figures of the analysis: t-maps on the sheet, Moran's I against its null, correlation by distance,
response profiles. Each takes `results`, a list of (loaded model, measures) pairs; a loaded model
has `name`, `title` and `label`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from topolm.analysis import CONDITIONS, contrast_names, correlation_by_distance, distance_bin_edges, undefined_map
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

MAP_DPI = 100
"""Dots per inch of the maps' figures, on screen and in the PNG."""
PANEL_SHORT_PX = 150
"""A map panel's shorter side is at least this many pixels at MAP_DPI, so the significance dots show."""
PANEL_LONG_PX = 200
"""... and its longer side at least this many (a square sheet: 200 x 200 px panels)."""


def sheet_shape(coords: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of the grid the unit coordinates span: coords (..., 2) of (row, col) cells, 0-based."""
    coords = np.asarray(coords).reshape(-1, 2)
    return int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1


def panel_pixels(shape: tuple[int, int]) -> tuple[float, float, float]:
    """(width, height, cell) in pixels at MAP_DPI of a map panel of a rows x cols sheet: square cells, the
    short side at least PANEL_SHORT_PX and the long side at least PANEL_LONG_PX."""
    rows, cols = shape
    cell = max(PANEL_LONG_PX / max(rows, cols), PANEL_SHORT_PX / min(rows, cols))
    return cols * cell, rows * cell, cell


def _dot_size(cell_px: float, dpi: float) -> float:
    """Marker area (points^2) of a significance dot: a disc 0.45 of a cell across."""
    return (0.45 * cell_px * 72.0 / dpi) ** 2


def _sheet_image(values: np.ndarray, coords: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Per-cell mean of unit values on the rows x cols grid (`shape`, default the one the coordinates span);
    NaN where no unit sits."""
    size = sheet_shape(coords) if shape is None else shape
    total = np.zeros(size)
    count = np.zeros(size)
    np.add.at(total, (coords[:, 0], coords[:, 1]), values)
    np.add.at(count, (coords[:, 0], coords[:, 1]), 1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _draw_map(ax, t: np.ndarray, marked: np.ndarray, coords: np.ndarray, vmax: float, dot: float,
              shape: tuple[int, int] | None = None):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.8")
    vmax = 1.0 if vmax is None else vmax  # no colour bar is drawn then: t is 0 (white) or undefined (grey)
    image = ax.imshow(_sheet_image(t, coords, shape), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
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


def _map_grid(results: list[tuple]):
    """The figure and (rows, cols) axes of plot_maps: n_layer columns (wrapped at 12) x (attn, mlp) rows per
    model, every panel sized by panel_pixels for the sheet's rows x cols. Returns fig, axes, wraps, shape, cell px."""
    import matplotlib.pyplot as plt

    n_layer = results[0][0].model.config.n_layer
    cols = min(n_layer, 12)
    wraps = math.ceil(n_layer / cols)
    rows = 2 * wraps * len(results)
    shape = sheet_shape(np.concatenate([np.reshape(m["coords"], (-1, 2)) for _, m in results]))
    width, height, cell = panel_pixels(shape)
    # room around each panel (its title, the row's label), the colour bar on the right and the title lines on top
    fig_w = cols * (width / MAP_DPI + 0.45) + 1.6
    fig_h = rows * (height / MAP_DPI + 0.35) + 1.5
    fig, axes = plt.subplots(rows, cols, figsize=(max(fig_w, 6.0), fig_h), dpi=MAP_DPI, squeeze=False,
                             layout="constrained")
    return fig, axes, wraps, shape, cell


def _maps_title(results: list[tuple], contrast: str, q: float, smoothed: bool, shape: tuple[int, int]) -> str:
    what, _ = contrast_label(results[0][1], contrast)
    titles = ", below it ".join(loaded.title for loaded, _ in results)
    sheet = f"sheet of every site ({shape[0]} x {shape[1]} cells)"
    if smoothed:
        fwhm = float(results[0][1]["fwhm"])
        how = (f"smoothed readout (Gaussian, FWHM {fwhm:g} grid spacings),\nWelch t per cell on the {sheet}\n"
               f"{titles}\nI: Moran's I of the smoothed map; smoothing alone raises it: compare it\nwith its null "
               f"(positions shuffled, then smoothed; morans_i.png), never with 0")
    else:
        how = (f"Welch t per unit on the {sheet}\n{titles}\n{_mark_text(contrast, q)}; "
               f"I: Moran's I (unsmoothed)")
    return f"{what}: {how}; {UNDEFINED_NOTE}"


def plot_maps(results: list[tuple], contrast: str, q: float, smoothed: bool = False) -> "object":
    """Every site's t-map, n_layer columns (wrapped at 12) x (attn, mlp) rows, per model; `smoothed`: the t-maps of
    the smoothed readout (`t_smoothed_<contrast>`), without selective units (no FDR test runs on them).

    The sheet's rows x cols come from the units' coordinates; each panel is at least PANEL_SHORT_PX x
    PANEL_LONG_PX pixels at MAP_DPI (panel_pixels); one colour scale, symmetric around 0, for every panel of
    every model, its bar labelled in t."""
    key = f"smoothed_{contrast}" if smoothed else contrast
    n_layer = results[0][0].model.config.n_layer
    fig, axes, wraps, shape, cell = _map_grid(results)
    cols = axes.shape[1]
    vmax = _vmax(results, contrast, smoothed)
    image = None
    for k, (loaded, m) in enumerate(results):
        names = [str(n) for n in m["site_names"]]
        for s, name in enumerate(names):
            layer, kind = s // 2, s % 2
            row = (k * wraps + layer // cols) * 2 + kind
            ax = axes[row, layer % cols]
            marks = np.zeros(len(m["coords"][s]), bool) if smoothed else _marks(m, contrast, q)[s]
            image = _draw_map(ax, m[f"t_{key}"][s], marks, m["coords"][s], vmax, _dot_size(cell, MAP_DPI), shape)
            ax.set_title(f"L{layer} {'attn' if kind == 0 else 'mlp'}  {_moran_text(m, s, key)}", fontsize=8, pad=2)
            if layer % cols == 0:
                ax.set_ylabel(f"{loaded.title}\nattn" if kind == 0 else "mlp", fontsize=8)
        for layer in range(n_layer, wraps * cols):
            for kind in range(2):
                axes[(k * wraps + layer // cols) * 2 + kind, layer % cols].axis("off")
    scale = "" if vmax is not None else "\nno colour scale: t is 0 or undefined at every unit of every map"
    fig.suptitle(_maps_title(results, contrast, q, smoothed, shape) + scale, fontsize=9)
    if vmax is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=0.7, aspect=30)
        cbar.set_label(f"Welch t ({contrast_label(results[0][1], contrast)[1]})", fontsize=9)
        cbar.ax.tick_params(labelsize=8)
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
    handles, labels = axes[0].get_legend_handles_labels()
    # below the panels, in the figure's own room: inside a panel it hid points and ran past the figure's edge
    ncol = 2 if smoothed else len(results)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=ncol, frameon=False)
    fig.suptitle("Spatial autocorrelation of every site's t-map (queen contiguity, row-standardised);\n"
                 "bars: 95% band of the same map's I with the units' positions shuffled", fontsize=9)
    legend_rows = math.ceil(len(labels) / ncol)
    fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.2 * legend_rows)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / fig.get_figheight(), 1, 1))
    return fig


def readout_figures(results: list[tuple], q: float, out: Path) -> list[Path]:
    """The smoothed readout's t-maps, `<contrast>_maps_smoothed.png` in `out`, where it was measured (fwhm > 0)."""
    contrasts = contrast_names(results[0][1])
    if f"t_smoothed_{contrasts[0]}" not in results[0][1]:
        return []
    return [save_figure(plot_maps(results, contrast, q, smoothed=True), out / f"{contrast}_maps_smoothed.png")
            for contrast in contrasts]


def _site_grid(n_sites: int, width: float, height: float, sharey: bool = False):
    import matplotlib.pyplot as plt

    n_layer = n_sites // 2
    cols = min(n_layer, 8)
    wraps = math.ceil(n_layer / cols)
    fig, axes = plt.subplots(2 * wraps, cols, figsize=(width * cols + 0.8, height * 2 * wraps + 1.0), dpi=90,
                             squeeze=False, sharey=sharey)
    for layer in range(n_layer, wraps * cols):
        for kind in range(2):
            axes[(layer // cols) * 2 + kind, layer % cols].axis("off")
    return fig, [axes[(s // 2 // cols) * 2 + s % 2, (s // 2) % cols] for s in range(n_sites)]


def pair_counts(coords: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n_bins,) unit pairs per distance bin: the pairs analysis.correlation_by_distance averages (every
    unordered pair of distinct units once; distance 0 in no bin). coords (n_units, 2); edges (n_bins + 1,)."""
    coords = np.asarray(coords)
    return correlation_by_distance(np.zeros((len(coords), len(coords))), coords, edges)["counts"]


CORRELATION_NOTE = ("grey bars (right axis): unit pairs per distance bin. Few pairs lie at the largest distances "
                    "(only the sheet's far corners are that far apart),\nso the curve there averages few pairs and "
                    "can rise again by chance: read it where the bars are tall")


def _pair_bars(ax, m: dict, s: int, edges: np.ndarray, first: bool):
    """The site's pair counts as bars on a second y axis behind the curves; returns that axis."""
    counts = pair_counts(m["coords"][s], edges)
    twin = ax.twinx()
    twin.set_label(f"pairs {m['site_names'][s]}")
    twin.bar((edges[:-1] + edges[1:]) / 2, counts, width=0.9, color="0.85", zorder=0,
             label="unit pairs per bin (right axis)" if first else None)
    twin.tick_params(labelsize=6, colors="0.45")
    ax.set_zorder(twin.get_zorder() + 1)  # the curves over the bars
    ax.patch.set_visible(False)
    return twin


def plot_correlation(results: list[tuple]):
    """Mean correlation by grid distance per site, each model's and its shuffled-position null, over the number
    of unit pairs in each distance bin (bars on a second axis; of the first model's layout, and of the
    compared model's where its layout differs)."""
    fig, axes = _site_grid(len(results[0][1]["site_names"]), 2.3, 1.9)
    colours = ["C3", "C0"]
    m0 = results[0][1]
    edges = m0["corr_edges"] if "corr_edges" in m0 else distance_bin_edges(np.reshape(m0["coords"], (-1, 2)))
    cols = min(len(axes) // 2, 8)  # _site_grid's columns: the right axis is labelled in the last one
    twins = []
    for s, ax in enumerate(axes):
        twins.append(_pair_bars(ax, m0, s, edges, s == 0))
        for k, (loaded, m) in enumerate(results[1:], 1):
            if not np.array_equal(m["coords"][s], m0["coords"][s]):
                twins[s].step((edges[:-1] + edges[1:]) / 2, pair_counts(m["coords"][s], edges), where="mid",
                              color=colours[k], alpha=0.5, linewidth=0.8)
        if (s // 2) % cols == cols - 1:
            twins[s].set_ylabel("unit pairs", fontsize=6, color="0.45")
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
    handles, labels = axes[0].get_legend_handles_labels()
    bar_handles, bar_labels = twins[0].get_legend_handles_labels()
    fig.legend(handles + bar_handles, labels + bar_labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("Correlation of unit responses on held-out text, by distance on the sheet\n" + CORRELATION_NOTE,
                 fontsize=8)
    fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.4)
    fig.tight_layout(rect=(0, 0.06, 1, 0.9))
    return fig


def plot_profile(results: list[tuple]):
    # one y scale for every panel: a site's bars are compared with the other sites' by eye
    fig, axes = _site_grid(len(results[0][1]["site_names"]), 2.1, 1.8, sharey=True)
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
    for ax in axes:
        ax.yaxis.set_tick_params(labelleft=True)  # shared, but every panel keeps its numbers
    fig.legend(fontsize=7, loc="lower center", ncol=2)
    fig.suptitle("Language-selective units (S > N): mean response to sentences, word lists, jabberwocky, nonwords\n"
                 "(one y scale for every site); selected on odd items, measured on even ones and vice versa;\n"
                 "n = units selected per fold; "
                 "bars: s.e.m. over items", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.89))
    return fig




def plot_maps_over_steps(model_config, steps: list[int], arrays: list[dict], contrast: str, q: float, title: str):
    """Every site's t-map of `contrast` at several steps of one run, side by side: one row per site (L<layer>
    attn / mlp), one column per step (arrays[k]: topolm.topography.map_arrays of the checkpoint after steps[k]);
    one colour scale, symmetric around 0, over every panel; dots: the selective units (as plot_maps)."""
    import matplotlib.pyplot as plt

    names = [str(n) for n in arrays[0]["site_names"]]
    shape = sheet_shape(np.concatenate([np.reshape(m["coords"], (-1, 2)) for m in arrays]))
    width, height, cell = panel_pixels(shape)
    fig, axes = plt.subplots(len(names), len(steps), dpi=MAP_DPI, squeeze=False, layout="constrained",
                             figsize=(max(len(steps) * (width / MAP_DPI + 0.3) + 1.6, 5.0),
                                      len(names) * (height / MAP_DPI + 0.35) + 1.2))
    vmax = _vmax([(None, m) for m in arrays], contrast)
    image = None
    for k, (step, m) in enumerate(zip(steps, arrays)):
        for s, name in enumerate(names):
            ax = axes[s, k]
            image = _draw_map(ax, m[f"t_{contrast}"][s], _marks(m, contrast, q)[s], m["coords"][s], vmax,
                              _dot_size(cell, MAP_DPI), shape)
            ax.set_title(f"step {step}  {_moran_text(m, s, contrast)}", fontsize=8, pad=2)
            if k == 0:
                layer, kind = s // 2, s % 2
                ax.set_ylabel(f"L{layer} {'attn' if kind == 0 else 'mlp'}", fontsize=8)
    what, short = contrast_label(arrays[0], contrast)
    fig.suptitle(f"{what}: Welch t per unit over training, {title}\n{_mark_text(contrast, q)}; I: Moran's I; "
                 f"{UNDEFINED_NOTE}", fontsize=9)
    if vmax is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=0.7, aspect=30)
        cbar.set_label(f"Welch t ({short})", fontsize=9)
    return fig


def plot_development(dev: dict, title: str):
    """The measures of development.py's JSON against step: task loss (train, val), Moran's I of each contrast with
    its shuffled-position null (dashed), the adjacent and far correlation, the full-grid spatial loss (site means)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=MAP_DPI, layout="constrained")
    ax = axes[0, 0]
    for split in ("train", "val"):
        ax.plot(dev["steps"], dev["task_loss"][split], marker="o", ms=3, label=split)
    ax.set(title="task loss (cross-entropy)", xlabel="step", ylabel="nats / token")
    ax.legend(fontsize=8)
    topo = dev["topography"]
    steps, mean = topo["steps"], topo["mean"]
    ax = axes[0, 1]
    for n, c in enumerate(dev["contrasts"]):
        line, = ax.plot(steps, _nan(mean[c]["morans_i"]), marker="o", ms=3, label=CONTRAST_LABELS.get(c, (c, dev["contrasts"][c]))[1])
        ax.plot(steps, _nan(mean[c]["null_i"]), ls="--", color=line.get_color(), label=f"{c}: null (positions shuffled)")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set(title="Moran's I of the t-map (site mean)", xlabel="step", ylabel="I")
    if dev["contrasts"]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured (the model's token ids are not GPT-2's)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, _nan(mean["adjacent_corr"]), marker="o", ms=3, label="adjacent units (distance 1, sqrt 2)")
    ax.plot(steps, _nan(mean["far_corr"]), marker="o", ms=3, label="far units (distance >= 6)")
    ax.set(title="correlation on held-out text (site mean)", xlabel="step", ylabel="Pearson r")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot(steps, _nan(mean["spatial_loss"]), marker="o", ms=3)
    ax.set(title="full-grid spatial loss (site mean)", xlabel="step", ylabel="spatial loss")
    fig.suptitle(title, fontsize=10)
    return fig


def _nan(values: list) -> list[float]:
    """JSON's null (an undefined value) as NaN, which matplotlib leaves out of a line."""
    return [math.nan if v is None else v for v in values]


# ----------------------------------------------------------------------------- the ablation sweep

ABLATION_METRICS = (("blimp", "BLiMP accuracy (fraction of pairs)"), ("val_loss", "validation loss (nats per token)"))


def _ablation_series(record: dict, key: str) -> tuple[list, list, list, list, list]:
    """(k, top-k, random mean, random min, random max) of one metric, k = 0 the intact model."""
    intact = record["intact"][key]
    rows = [(0, intact, intact, intact, intact)]
    rows += [(e["k"], e["selective"][key], e["random"][key]["mean"], e["random"][key]["min"], e["random"][key]["max"])
             for e in record["sweep"] if e["k"] > 0]
    return tuple(list(column) for column in zip(*rows))


def plot_ablation(models: list[tuple[str, dict]], select: str, where: str, draws: int):
    """The ablation sweep as curves against k: for every model (title, record as ablate.py writes it: `intact`,
    `sweep`), the k most selective units' scores and the mean of the random draws with their min-max band;
    BLiMP accuracy, and the validation loss where it was measured. k = 0 is the intact model; the x axis is
    symmetric-log (linear below 1), so k = 0 and k = 12544 share it."""
    import matplotlib.pyplot as plt

    metrics = [(key, label) for key, label in ABLATION_METRICS if models[0][1]["intact"][key] is not None]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.9), dpi=90, squeeze=False)
    colours = ["C3", "C0"]
    for ax, (key, label) in zip(axes[0], metrics):
        for c, (title, record) in enumerate(models):
            k, top, mean, lo, hi = _ablation_series(record, key)
            ax.plot(k, top, "-o", color=colours[c], markersize=4, label=f"{title}: top-k selective units")
            ax.plot(k, mean, "--s", color=colours[c], mfc="none", markersize=4,
                    label=f"{title}: random units, mean of {draws} draws")
            ax.fill_between(k, lo, hi, color=colours[c], alpha=0.15, linewidth=0,
                            label=f"{title}: random units, min to max")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("k: units zeroed per site" if select == "site" else "k: units zeroed in all (top-k over the "
                      "network)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # below the panels, in the figure's own room (the curves fill the panels): one column of three per model
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(models), frameon=False)
    where_text = ("the site's output" if where == "site" else "the sublayer's input (c_attn / c_fc input columns)")
    fig.suptitle(f"Ablation of the most language-selective units (localizer t) vs random units;\nunits chosen "
                 f"{'per site' if select == 'site' else 'over the whole network'}, zeroed at {where_text}; "
                 f"k = 0: the intact model", fontsize=9)
    rows = 3
    fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.18 * rows)
    fig.tight_layout(rect=(0, (0.18 * rows + 0.1) / fig.get_figheight(), 1, 1))
    return fig
