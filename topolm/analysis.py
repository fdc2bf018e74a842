"""Measures of what a trained TopoLM built on its sheets (the evaluation of Rathi et al. 2025); `analyze.py` is the command.

Everything here takes unit coordinates (n_units, 2) as given, so a layout may be any set of
integer cells: a permutation of the grid (this project's layouts) or one with empty and shared
cells (imported research layouts). On the sheet, units that share a cell are averaged into one
value, and empty cells are not part of the map.

- Responses (`site_responses`): an item is run after an `<|endoftext|>` prefix, as documents
  start in training; a site's response is its activation (as `with_resid` defines it) averaged
  over the item's own tokens, or over the target word's tokens, never over the prefix. Items
  are batched by exact token length, never padded, so a response is bit-identical at every
  batch size (on the CPU; topolm.batching). A NaN or infinite response (or held-out activation)
  is an error naming the site and the stimulus, never a number of a statistic (`require_finite`).
- Items that do not fit the model's block (`Stimuli.fitting`) are left out, never cut, with their
  matched counterparts: localizer item k leaves every condition, a word leaves with all its frames.
- Contrasts (`welch_t`, `fdr`): per unit a Welch t-test across items (scipy.stats.ttest_ind,
  equal_var=False), Benjamini-Hochberg FDR over the units of each site, or of all sites pooled
  (scipy.stats.false_discovery_control). A unit is selective when its adjusted p <= q and t > 0.
- The statistics' choices (`StatisticsKeys`): FDR per site or pooled, Moran's I of the map or also
  of the significant units only (`significant_morans_i`), the profile's signed or absolute mean, and
  the fMRI-like readout (`fwhm`; topolm.readout) beside the unsmoothed numbers.
- Clusters of the localizer t-map and their held-out response profiles: topolm.clusters.
- Undefined statistics stay undefined (NaN; null in summary.json, with the reason), never a
  finding: Welch's t of a unit with zero variance in both groups or of a side with fewer than 2
  items; Moran's I and its p of a constant t-map or one with an undefined unit (`undefined_map`).
  They are no FDR test, select no unit, and are left out of every count and site mean.
- Response profile (`response_profile`, `response_profiles`): units selected on the odd items and
  measured on the even ones, and the other way round (no item both selects and measures).
- Moran's I (`morans_i`): queen contiguity (8 neighbours) between occupied cells, row-
  standardised weights, I = (n / S0) z'Wz / z'z (the definition of PySAL's esda.Moran, against
  which it is tested), with esda's permutation p-value. The null for a model (`null_morans_i`)
  is the same map with the units' positions shuffled.
- Topography (`correlation_by_distance`): Pearson correlation of every pair of units over
  held-out tokens, averaged in bins of grid distance (TDANN; Margalit et al. 2024); "adjacent"
  is distance 1 or sqrt(2), "far" is 6 or more. Null: positions shuffled.
- The full-grid spatial loss (`full_grid_spatial_loss`): the training loss (positions.py) over
  every neighborhood of a site, on held-out correlations.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse
import scipy.stats
import torch

from topolm.batching import filled, invariant_kernels, length_batches
from topolm.checkpoint import recorded_val_bin
from topolm.config import Checked, UserError, require
from topolm.files import read_text
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding
from positions import spatial_losses

ADJACENT_MAX = 1.5  # grid distance 1 or sqrt(2)
FAR_MIN = 6.0
CONDITIONS = ("S", "W", "J", "N")
CONTRASTS = ("localizer", "verb_noun")


@dataclass
class StatisticsKeys(Checked):
    """The statistics' choices (analyze.py's keys): this project's defaults, and the paper's (Rathi et al. 2025) beside them."""
    fwhm: float = 0.0
    """fMRI-like readout: smooth every stimulus's responses on the sheet with a Gaussian of this full width at
    half maximum (grid spacings; 2 is the paper's) and report each contrast's smoothed t-map and Moran's I
    beside their shuffled-position null (positions shuffled, then smoothed: topolm.readout), after the
    unsmoothed numbers, which stay the headline; 0: off."""
    fdr: Literal["site", "pooled"] = "site"
    """Benjamini-Hochberg FDR over the units of each site ('site'), or over the units of all sites together
    ('pooled', the paper's): the selective units, their fractions and the response profile's selection."""
    moran: Literal["map", "significant"] = "map"
    """'map': Moran's I of the unthresholded t-map; 'significant': also Moran's I of the FDR-significant
    units only (either sign; the others left out as empty cells), with its p and null, beside the map's."""
    profile: Literal["signed", "abs"] = "signed"
    """Response profile of the selective units: mean activation ('signed') or mean absolute activation
    ('abs', the paper's)."""

    def __post_init__(self):
        super().__post_init__()
        require(math.isfinite(self.fwhm) and self.fwhm >= 0,
                f"fwhm={self.fwhm} must be >= 0 (0: no smoothing; 2: the paper's readout)")


# ----------------------------------------------------------------------------- tokens and responses

def tokenize_items(texts: list[str], encoding, spans: list[tuple[int, int]] | None = None
                   ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token ids of each item and the token range a response is read at.

    spans: optional character ranges (start, end) of a target word per text; the target's tokens
    include the space before it (GPT-2 attaches it to the word). Without spans the range is the
    whole item. Token ranges are (first, stop) into the item's ids, before any prefix.
    Raises ValueError when the target does not fall on token boundaries.
    """
    ids, ranges = [], []
    for k, text in enumerate(texts):
        full = encoding.encode_ordinary(text)
        if not full:
            raise ValueError(f"item {k} is empty")
        if spans is None:
            ids.append(full)
            ranges.append((0, len(full)))
            continue
        start, end = spans[k]
        cut = start - 1 if start > 0 and text[start - 1] == " " else start
        pre, target = encoding.encode_ordinary(text[:cut]), encoding.encode_ordinary(text[cut:end])
        if pre + target + encoding.encode_ordinary(text[end:]) != full or not target:
            raise ValueError(f"the target {text[start:end]!r} of {text!r} does not fall on token boundaries")
        ids.append(full)
        ranges.append((len(pre), len(pre) + len(target)))
    return ids, ranges


def require_finite(values: np.ndarray, site: str, what, total_what: str) -> None:
    """Refuse a response that is not a number: values (n, ...) of one site, what(i) names the i-th one.

    Raises UserError naming the site, the first non-finite value's stimulus (`what`) and the reason: a
    NaN or inf response is never a statistic (its t would be undefined, or a number of nothing)."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        kind = "NaN" if np.isnan(values[first]).any() else "infinite"
        raise UserError(f"the response of site {site} to {what(first)} is {kind} ({int(bad.sum())} of {len(values)} "
                        f"{total_what} are not finite): the model's activations are not numbers (NaN or inf in its "
                        f"weights?); nothing was written")


@torch.no_grad()
def site_responses(model, ids: list[list[int]], ranges: list[tuple[int, int]], batch_size: int = 32,
                   progress=None, labels: list[str] | None = None) -> np.ndarray:
    """Per-item responses of every site, (n_sites, n_items, n_embed) float32, sites in model.site_names order.

    Each item is prefixed with `<|endoftext|>` (position 0, never averaged); the response is the
    mean (in float64) of the site's activation over positions 1 + ranges[k][0] .. 1 + ranges[k][1] - 1,
    selected, never multiplied by a mask. Items run in batches of one exact length (topolm.batching:
    no padding; the math attention kernel on the CPU), so an item's response is bit-identical at
    every batch size on the CPU.
    `progress`: a tqdm-like object whose `update(n)` is called per batch; `labels`: a name per item for
    the errors (default "item <k>"). Raises ValueError if an item does not fit the model's block, and
    UserError (`require_finite`) for a NaN or infinite response.
    """
    names = model.site_names
    out = np.empty((len(names), len(ids), model.config.n_embed), dtype=np.float32)
    if not ids:
        return out
    lengths = np.array([1 + len(x) for x in ids], dtype=np.int64)
    if lengths.max() > model.config.block_size:
        raise ValueError(f"an item of {lengths.max() - 1} tokens (+1 prefix) exceeds block_size={model.config.block_size}")
    device = next(model.parameters()).device
    for batch in length_batches(lengths, batch_size):
        width = int(lengths[batch[0]])
        x = torch.tensor([[EOT_TOKEN] + ids[k] for k in filled(batch, width)], dtype=torch.long, device=device)
        first = torch.tensor([1 + ranges[k][0] for k in batch], device=device)[:, None]
        stop = torch.tensor([1 + ranges[k][1] for k in batch], device=device)[:, None]
        pos = torch.arange(width, device=device)[None, :]
        inside = ((pos >= first) & (pos < stop))[:, :, None]  # (B, T, 1)
        with invariant_kernels(device):
            acts = model.site_activations(x)
        for s, name in enumerate(names):
            a = acts[name][:len(batch)].double()
            mean = torch.where(inside, a, 0.0).sum(1) / (stop - first)
            out[s, batch] = mean.float().cpu().numpy()
            require_finite(out[s, batch], name, lambda i, batch=batch: labels[batch[i]] if labels else
                           f"item {batch[i]}", "responses of its batch")
        if progress is not None:
            progress.update(len(batch))
    return out


# ----------------------------------------------------------------------------- statistics

def welch_t(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t (a - b) and two-sided p per unit: a (n_a, ...), b (n_b, ...) -> two arrays (...).

    scipy.stats.ttest_ind(equal_var=False) along axis 0. Undefined, and so NaN in both arrays
    (never t = 0, p = 1 or t = +-inf, p = 0): a unit with zero variance in both groups (the
    standard error is 0) and every unit when a group has fewer than 2 items.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    if len(a) < 2 or len(b) < 2:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    with warnings.catch_warnings():  # scipy warns about (near-)constant units; they are handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy.stats.ttest_ind(a, b, axis=0, equal_var=False)
    t, p = np.asarray(res.statistic, np.float64), np.asarray(res.pvalue, np.float64)
    undefined = ((np.ptp(a, axis=0) == 0) & (np.ptp(b, axis=0) == 0)) | np.isnan(t)
    return np.where(undefined, np.nan, t), np.where(undefined, np.nan, p)


def fdr(p: np.ndarray, q: float = 0.05, pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg adjusted p-values along the last axis (the units of one site) and the mask adjusted <= q.

    scipy.stats.false_discovery_control(method='bh'); Benjamini & Hochberg (1995). pooled: one
    correction over every value of `p` (the units of all sites, the paper's) instead of one per row.
    An undefined (NaN) p is no test: it stays NaN, is never a discovery, and does not count among the tests.
    """
    p = np.asarray(p, np.float64)
    if pooled:
        adjusted, _ = fdr(p.reshape(1, -1), q)
        adjusted = adjusted.reshape(p.shape)
        return adjusted, ~np.isnan(adjusted) & (adjusted <= q)
    adjusted = np.full(p.shape, np.nan)
    for row in np.ndindex(p.shape[:-1]):
        defined = ~np.isnan(p[row])
        if defined.any():
            adjusted[row + (defined,)] = scipy.stats.false_discovery_control(p[row][defined], method="bh")
    return adjusted, ~np.isnan(adjusted) & (adjusted <= q)


def selective(t: np.ndarray, p: np.ndarray, q: float = 0.05, pooled: bool = False) -> np.ndarray:
    """Units significant after FDR (per site, last axis, or pooled: `fdr`) with t > 0 (never a unit with an undefined t)."""
    return fdr(p, q, pooled)[1] & (np.nan_to_num(t, nan=0.0) > 0)


def undefined_map(t: np.ndarray, n_items: tuple[int, int] | None = None,
                  n_left_out: tuple[int, int] | None = None) -> str | None:
    """Why Moran's I of one site's t-map (n_units,) is undefined, or None when it is not.

    n_items: the items on each side of the contrast (a side with fewer than 2 leaves t undefined);
    n_left_out: the items of each side left out as longer than the model's block (`Stimuli.fitting`)."""
    t = np.asarray(t, np.float64)
    if n_items is not None and min(n_items) < 2:
        why = ""
        if n_left_out is not None and max(n_left_out) > 0:
            why = (f"; {int(n_left_out[0])} vs {int(n_left_out[1])} left out, longer than the model's block or matched "
                   f"to an item that is")
        return (f"fewer than 2 items on a side ({int(n_items[0])} vs {int(n_items[1])}{why}): Welch's t is undefined "
                f"at every unit")
    n_nan = int(np.isnan(t).sum())
    if n_nan:
        return f"t undefined at {n_nan} of {t.size} units (zero variance in both groups): the map has holes"
    if np.ptp(t) == 0:
        return f"t = {t.flat[0]:g} at every unit: a constant map has no spatial autocorrelation (0/0)"
    return None


def response_profile(responses: dict[str, np.ndarray], q: float = 0.05, select=("S", "N"),
                     profile: str = "signed") -> dict:
    """Cross-validated response of one site's selective units in every condition.

    responses: {condition: (n_items, n_units)}, item k of every condition built from the same
    sentence. Units are selected (Welch t of select[0] vs select[1], FDR q, t > 0) on the odd
    items and measured on the even ones, then the other way round; every item is measured once.
    profile: 'signed' measures the units' mean activation, 'abs' their mean absolute activation.
    Returns mean and sem (over items) per condition in `CONDITIONS` order, (4,) each (NaN when
    no unit was selected, or for a condition not in `responses`), `per_item` (4, n_items) and n_selected (2,) for the two folds.
    """
    out = response_profiles({c: np.asarray(r)[None] for c, r in responses.items()}, q, select, profile=profile)
    return {k: v[0] for k, v in out.items()}


def response_profiles(responses: dict[str, np.ndarray], q: float = 0.05, select=("S", "N"), pooled: bool = False,
                      profile: str = "signed") -> dict:
    """`response_profile` of every site at once: responses {condition: (n_sites, n_items, n_units)}.

    pooled: the selection's FDR runs over the units of all sites together (`fdr`), per fold. Returns
    mean, sem (n_sites, 4), per_item (n_sites, 4, n_items) and n_selected (n_sites, 2)."""
    if profile not in ("signed", "abs"):
        raise ValueError(f"profile={profile!r} must be 'signed' or 'abs'")
    n_sites, n_items = np.shape(responses[select[0]])[:2]
    index = np.arange(n_items)
    per_item = np.full((n_sites, len(CONDITIONS), n_items), np.nan)
    n_selected = np.zeros((n_sites, 2), dtype=np.int64)
    for fold, (choose, measure) in enumerate(((index % 2 == 1, index % 2 == 0), (index % 2 == 0, index % 2 == 1))):
        t, p = welch_t(np.swapaxes(responses[select[0]][:, choose], 0, 1),
                       np.swapaxes(responses[select[1]][:, choose], 0, 1))
        units = selective(t, p, q, pooled)
        n_selected[:, fold] = units.sum(axis=1)
        for s in np.flatnonzero(units.any(axis=1)):
            for c, cond in enumerate(CONDITIONS):
                if cond not in responses:  # a localizer without this condition (EvLab's has S and N): NaN
                    continue
                x = responses[cond][s][measure][:, units[s]]
                per_item[s, c, measure] = (np.abs(x) if profile == "abs" else x).mean(axis=1)
    counts = np.sum(~np.isnan(per_item), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.nansum(per_item, axis=-1) / np.maximum(counts, 1), np.nan)
        sd = np.sqrt(np.nansum((per_item - mean[..., None]) ** 2, axis=-1) / np.maximum(counts - 1, 1))
    sem = np.where(counts > 1, sd / np.sqrt(np.maximum(counts, 1)), np.nan)
    return {"mean": mean, "sem": sem, "per_item": per_item, "n_selected": n_selected}


def significant_undefined(t: np.ndarray, significant: np.ndarray, coords: np.ndarray) -> str | None:
    """Why Moran's I of the significant units only (t (n_units,) where significant (n_units,) bool, the
    others left out as empty cells; coords (n_units, 2)) is undefined, or None when it is not.

    It needs at least 3 occupied cells with an occupied queen neighbour: with fewer, z'Wz rests on one
    pair of cells or none (0/0), and I is no measure of a map."""
    significant = np.asarray(significant, bool)
    n = int(significant.sum())
    if n == 0:
        return "no unit is significant after FDR: there is no map of significant units"
    cells = SheetCells.from_coords(np.asarray(coords)[significant])
    connected = int((np.diff(cells.weights.indptr) > 0).sum())
    if connected < 3:
        return (f"only {connected} of the {len(cells.cell_xy)} cells of the {n} significant units have a significant "
                f"neighbour: Moran's I needs at least 3 connected cells")
    values = cells.cell_values(np.asarray(t, np.float64)[significant])
    return undefined_map(values)


def significant_morans_i(t: np.ndarray, significant: np.ndarray, coords: np.ndarray, shuffles: np.ndarray,
                         permutations: int = 999, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Moran's I of the significant units only, its permutation p and its shuffled-position null.

    t (n_units,), significant (n_units,) bool, coords (n_units, 2); non-significant units are left
    out as empty cells (a cell keeps the mean of its significant units). shuffles (n_shuffles,
    n_units): the site's position shuffles; each gives a shuffle of the significant units among
    their own cells (the order its values put them in), so the null keeps the occupied cells.
    Returns (I, p, null (n_shuffles,)), all NaN when `significant_undefined` says why."""
    significant = np.asarray(significant, bool)
    if significant_undefined(t, significant, coords):
        return math.nan, math.nan, np.full(len(shuffles), np.nan)
    values, where = np.asarray(t, np.float64)[significant], np.asarray(coords)[significant]
    cells = SheetCells.from_coords(where)
    m = morans_i(values, where, permutations, seed, cells=cells)
    own = np.argsort(np.argsort(np.asarray(shuffles)[:, significant], axis=1), axis=1)
    return m.i, m.p, null_morans_i(values, cells, cells.unit_cell[own])


# ----------------------------------------------------------------------------- the sheet and Moran's I

@dataclass
class SheetCells:
    """The occupied cells of one site's layout, and queen-contiguity weights between them.

    cell_xy (n_cells, 2): occupied cells, sorted; unit_cell (n_units,): each unit's cell index;
    counts (n_cells,): units per cell; weights: (n_cells, n_cells) row-standardised CSR (a cell
    with no occupied neighbour is an island: a zero row); s0 the sum of the weights.
    """
    cell_xy: np.ndarray
    unit_cell: np.ndarray
    counts: np.ndarray
    weights: scipy.sparse.csr_matrix
    s0: float = field(init=False)

    def __post_init__(self):
        self.s0 = float(self.weights.sum())

    @classmethod
    def from_coords(cls, coords: np.ndarray) -> "SheetCells":
        coords = np.asarray(coords, dtype=np.int64)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"coords must be (n_units, 2); got {coords.shape}")
        cell_xy, unit_cell, counts = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
        return cls(cell_xy, unit_cell.reshape(-1), counts, queen_weights(cell_xy))

    def cell_values(self, values: np.ndarray, unit_cell: np.ndarray | None = None) -> np.ndarray:
        """Per-cell mean of unit values: (..., n_units) -> (..., n_cells). unit_cell overrides the layout's."""
        unit_cell = self.unit_cell if unit_cell is None else unit_cell
        values = np.asarray(values, np.float64)
        flat = values.reshape(-1, values.shape[-1])
        sums = np.stack([np.bincount(unit_cell, weights=v, minlength=len(self.cell_xy)) for v in flat])
        return (sums / self.counts).reshape(*values.shape[:-1], len(self.cell_xy))


def queen_weights(cell_xy: np.ndarray) -> scipy.sparse.csr_matrix:
    """Row-standardised queen contiguity between cells: neighbours share an edge or a corner."""
    cell_xy = np.asarray(cell_xy, np.int64)
    n = len(cell_xy)
    index = {tuple(c): i for i, c in enumerate(cell_xy.tolist())}
    rows, cols = [], []
    for i, (x, y) in enumerate(cell_xy.tolist()):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                j = index.get((x + dx, y + dy))
                if j is not None and j != i:
                    rows.append(i)
                    cols.append(j)
    w = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    degree = np.asarray(w.sum(axis=1)).reshape(-1)
    return scipy.sparse.diags(np.where(degree > 0, 1.0 / np.maximum(degree, 1), 0.0)) @ w


def _moran(y: np.ndarray, weights: scipy.sparse.csr_matrix, s0: float) -> np.ndarray:
    """Moran's I of cell maps y (..., n_cells): (n / S0) z'Wz / z'z, z = y - mean(y)."""
    z = y - y.mean(axis=-1, keepdims=True)
    lag = (weights @ z.reshape(-1, z.shape[-1]).T).T.reshape(z.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return z.shape[-1] / s0 * (z * lag).sum(-1) / (z * z).sum(-1)


@dataclass
class Moran:
    i: float
    p: float  # pseudo p-value from permutations, as esda's p_sim; NaN without permutations
    expected: float  # -1 / (n - 1)
    simulated: np.ndarray  # I of every permutation


def morans_i(values: np.ndarray, coords: np.ndarray, permutations: int = 999, seed: int = 0,
             cells: SheetCells | None = None) -> Moran:
    """Moran's I of one unit map on the sheet (units sharing a cell averaged, empty cells left out).

    values (n_units,), coords (n_units, 2). p is esda's p_sim: the permutations (of the cell
    values, from np.random.RandomState(seed), as esda draws them after np.random.seed(seed)) at
    least as extreme as I in its own direction, (larger + 1) / (permutations + 1), where larger
    is the smaller of the counts at or above I and below it. A constant map, or one with an
    undefined (NaN) value, has I = NaN and p = NaN: an undefined statistic is never significant.
    """
    cells = cells or SheetCells.from_coords(coords)
    y = cells.cell_values(values)
    i = float(_moran(y, cells.weights, cells.s0))
    sims = np.empty(0)
    p = math.nan
    if permutations and not math.isnan(i):
        rs = np.random.RandomState(seed)
        z = y - y.mean()
        sims = _moran(np.stack([rs.permutation(z) for _ in range(permutations)]), cells.weights, cells.s0)
        larger = int((sims >= i).sum())
        larger = min(larger, permutations - larger)
        p = (larger + 1.0) / (permutations + 1.0)
    return Moran(i, p, -1.0 / (len(y) - 1), sims)


def null_morans_i(values: np.ndarray, cells: SheetCells, shuffles: np.ndarray) -> np.ndarray:
    """Moran's I of the same unit values with shuffled positions: shuffles (n_shuffles, n_units) -> (n_shuffles,)."""
    y = np.stack([cells.cell_values(values, s) for s in shuffles])
    return _moran(y, cells.weights, cells.s0)


# ----------------------------------------------------------------------------- correlation and distance

def distance_bin_edges(coords: np.ndarray) -> np.ndarray:
    """Bins of grid distance one wide, centred on 1, 2, 3, ...: [0.5, 1.5), [1.5, 2.5), ...

    The first bin holds exactly distances 1 and sqrt(2) (adjacent cells); distance 0 (units
    sharing a cell) falls in no bin.
    """
    span = np.ptp(np.asarray(coords), axis=0)
    return np.arange(0.5, math.hypot(*span) + 1.5, 1.0)


def _pair_distances(coords: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    diff = (coords[rows] - coords[cols]).astype(np.float64)
    return np.sqrt((diff ** 2).sum(-1))


def correlation_by_distance(corr: np.ndarray, coords: np.ndarray, edges: np.ndarray | None = None) -> dict:
    """Mean pairwise correlation in bins of grid distance, and at adjacent and far distances.

    corr (n_units, n_units) Pearson correlations; coords (n_units, 2). Every unordered pair of
    distinct units counts once. Returns `edges`, `centres` (mean distance of the pairs in each
    bin), `curve` (n_bins,) (NaN for an empty bin), `adjacent` (0 < d < 1.5) and `far` (d >= 6).
    """
    coords = np.asarray(coords)
    edges = distance_bin_edges(coords) if edges is None else edges
    rows, cols = np.triu_indices(len(coords), k=1)
    d = _pair_distances(coords, rows, cols)
    r = np.asarray(corr, np.float64)[rows, cols]
    return _binned(r, d, edges)


def _binned(r: np.ndarray, d: np.ndarray, edges: np.ndarray) -> dict:
    which = np.digitize(d, edges) - 1
    inside = (which >= 0) & (which < len(edges) - 1)
    n_bins = len(edges) - 1
    counts = np.bincount(which[inside], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.bincount(which[inside], weights=r[inside], minlength=n_bins) / counts
        centres_ = np.bincount(which[inside], weights=d[inside], minlength=n_bins) / counts
    adjacent = (d > 0) & (d < ADJACENT_MAX)
    far = d >= FAR_MIN
    return {"edges": edges, "centres": centres_, "curve": curve, "counts": counts,
            "adjacent": float(r[adjacent].mean()) if adjacent.any() else math.nan,
            "far": float(r[far].mean()) if far.any() else math.nan}


def null_correlation_by_distance(corr: np.ndarray, coords: np.ndarray, shuffles: np.ndarray,
                                 edges: np.ndarray | None = None) -> dict:
    """`correlation_by_distance` averaged over position shuffles; shuffles (n_shuffles, n_units) of unit indices.

    Shuffle s gives unit u the coordinates of unit shuffles[s, u]."""
    coords = np.asarray(coords)
    edges = distance_bin_edges(coords) if edges is None else edges
    rows, cols = np.triu_indices(len(coords), k=1)
    r = np.asarray(corr, np.float64)[rows, cols]
    runs = [_binned(r, _pair_distances(coords[s], rows, cols), edges) for s in shuffles]
    with warnings.catch_warnings():  # a bin no shuffle fills stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"edges": edges, "centres": np.nanmean([x["centres"] for x in runs], axis=0),
                "curve": np.nanmean([x["curve"] for x in runs], axis=0),
                "adjacent": float(np.mean([x["adjacent"] for x in runs])),
                "far": float(np.mean([x["far"] for x in runs]))}


class CorrelationAccumulator:
    """Pearson correlations of every pair of units per site, from activations streamed in batches.

    Sums in float64 on the CPU: add(acts (n_sites, N, n_units)) any number of times, then
    `correlations()` -> (n_sites, n_units, n_units) and `n` samples.
    """

    def __init__(self, n_sites: int, n_units: int):
        self.n = 0
        self.sum = np.zeros((n_sites, n_units))
        self.gram = np.zeros((n_sites, n_units, n_units))
        self.shift = None  # the first batch's mean: keeps the sums of squares well conditioned

    def add(self, acts: np.ndarray) -> None:
        x = np.asarray(acts, np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=1, keepdims=True)
        x = x - self.shift
        self.n += x.shape[1]
        self.sum += x.sum(axis=1)
        self.gram += x.transpose(0, 2, 1) @ x

    def correlations(self) -> np.ndarray:
        mean = self.sum / self.n
        cov = self.gram / self.n - mean[:, :, None] * mean[:, None, :]
        var = np.diagonal(cov, axis1=1, axis2=2)
        with np.errstate(divide="ignore"):
            inv_std = np.where(var > 0, 1.0 / np.sqrt(np.maximum(var, 0.0)), 0.0)  # a constant unit: r = 0
        return cov * inv_std[:, :, None] * inv_std[:, None, :]


def heldout_windows(tokens: np.ndarray, n_tokens: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Non-overlapping windows of held-out tokens, (n_windows, seq_len) int64, about n_tokens in all.

    Windows start at seeded random multiples of seq_len (all of them when the text is short).
    """
    tokens = np.asarray(tokens)
    seq_len = min(seq_len, len(tokens))
    available = len(tokens) // seq_len
    want = min(available, max(1, math.ceil(n_tokens / seq_len)))
    starts = np.sort(np.random.default_rng(seed).choice(available, size=want, replace=False)) * seq_len
    return np.stack([tokens[s:s + seq_len].astype(np.int64) for s in starts])


@torch.no_grad()
def heldout_text(heldout: str, ckpt: dict, localizer: dict[str, list[str]]) -> tuple[np.ndarray, str, str]:
    """The held-out token ids (n_tokens,), their source (a file, or a description) and why that source:
    the file `heldout` (a uint16 .bin or UTF-8 text), else val.bin of the text the model was trained on (the
    checkpoint's `data` field: the folder recorded there, or, where that is gone, its dataset key resolved
    here), else the localizer's sentences (`localizer`: texts per condition). Raises UserError for a
    `heldout` file that is missing or not a token file."""
    enc = gpt2_encoding()
    if heldout:
        path = Path(heldout)
        if not path.is_file():
            raise UserError(f"heldout file not found: {path}")
        if path.suffix == ".bin":
            if path.stat().st_size % 2:
                raise UserError(f"heldout={path} is not a uint16 token file (odd size)")
            return np.fromfile(path, dtype=np.uint16), str(path), "heldout="
        return np.array(enc.encode_ordinary(read_text(path)), dtype=np.int64), str(path), "heldout="
    val = recorded_val_bin(ckpt, min_bytes=64)
    if val is not None:
        return np.memmap(val, dtype=np.uint16, mode="r"), str(val), f"the checkpoint's data ({ckpt['data']['dataset']})"
    text = " ".join(localizer.get("S") or next(iter(localizer.values())))
    return (np.array(enc.encode_ordinary(text), dtype=np.int64), "the localizer's sentences (no val.bin found)",
            "the fallback")


def heldout_correlations(model, windows: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, int]:
    """Unit correlations per site over held-out windows: (n_sites, n_embed, n_embed) float64 and the sample count.

    Each window runs after an `<|endoftext|>` prefix, which is left out of the samples.
    Raises ValueError if a window does not fit the model's block, UserError (`require_finite`) for an
    activation that is NaN or infinite.
    """
    if windows.shape[1] + 1 > model.config.block_size:
        raise ValueError(f"windows of {windows.shape[1]} tokens (+1 prefix) exceed block_size={model.config.block_size}")
    device = next(model.parameters()).device
    acc = CorrelationAccumulator(len(model.site_names), model.config.n_embed)
    for b in range(0, len(windows), batch_size):
        w = torch.as_tensor(windows[b:b + batch_size])
        x = torch.cat([torch.full((len(w), 1), EOT_TOKEN, dtype=torch.long), w], dim=1).to(device)
        acts = model.site_activations(x)
        batch = np.stack([acts[name][:, 1:].float().cpu().numpy() for name in model.site_names])
        for s, name in enumerate(model.site_names):
            require_finite(batch[s], name, lambda i, b=b: f"held-out window {b + i}", "held-out windows of its batch")
        acc.add(batch.reshape(len(batch), -1, batch.shape[-1]))
    return acc.correlations(), acc.n


def full_grid_spatial_loss(corr: np.ndarray, coords: np.ndarray, radius: int,
                           shape: tuple[int, int] | None = None) -> float:
    """The spatial loss averaged over every neighborhood of one site (not the few sampled in training).

    corr (n_units, n_units) float64 correlations, coords (n_units, 2) any layout on the rows x cols sheet
    `shape` (None: `positions.spatial_losses`' default); the per-neighborhood
    losses are `positions.spatial_losses` (the float64 numpy form of the training loss), neighborhoods
    without a defined loss (fewer than two units, or all on one cell) left out of the mean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layout with no defined neighborhood gives NaN
        return float(np.nanmean(spatial_losses(corr, coords, radius, shape)))


# ----------------------------------------------------------------------------- one model, every measure

CORRELATION_NULL_SHUFFLES = 10  # the nulls of the correlation curve and the spatial loss average this many shuffles


@dataclass
class Stimuli:
    """Tokenized stimulus sets (topolm.stimsets.StimulusSet), the localizer first, and the contrasts to run.

    ids[j], ranges[j]: the token ids and read ranges of set j's items; index[j] (n_kept,): the items kept, as
    indices into the set's items as read (all unless `fitting` left some out); dropped[j]: the items left out."""
    sets: list
    ids: list[list[list[int]]]
    ranges: list[list[tuple[int, int]]]
    contrasts: list
    index: list[np.ndarray] | None = None
    dropped: list[list] | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = [np.arange(len(s.items)) for s in self.sets]
        if self.dropped is None:
            self.dropped = [[] for _ in self.sets]

    @classmethod
    def build(cls, sets: list, contrasts: list, encoding) -> "Stimuli":
        """Tokenize every item (`tokenize_items`: read at its span, else whole). Raises ValueError naming the set."""
        ids, ranges = [], []
        for s in sets:
            try:
                i, r = tokenize_items([it.text for it in s.items], encoding,
                                      [it.span or (0, len(it.text)) for it in s.items])
            except ValueError as e:
                raise ValueError(f"{s.source}: {e}") from None
            ids.append(i)
            ranges.append(r)
        return cls(sets, ids, ranges, contrasts)

    @property
    def localizer(self):
        return self.sets[0]

    @property
    def n_items(self) -> int:
        return sum(len(x) for x in self.ids)

    @property
    def longest(self) -> int:
        return max((len(x) for ids in self.ids for x in ids), default=0)

    def fitting(self, block_size: int) -> tuple["Stimuli", dict]:
        """The matched stimuli a model with `block_size` reads whole: an item fits when its tokens and the
        `<|endoftext|>` prefix do (len + 1 <= block_size).

        Cutting an item would bias the contrasts (a nonword list has 2-3x the tokens of its sentence), so
        an item that does not fit is left out, matched: with every item sharing its match key (localizer
        item k leaves every condition) and every row of its sample (a word leaves with all its frames).
        Returns the kept stimuli and the counts {"block_size", "too_long": {key: samples that do not fit
        themselves}, "left_out": {key: samples left out}}, keys (`count_keys`) the localizer's conditions
        and the levels of the other sets ('noun', 'verb'; '<set>:<level>' beyond the shipped two sets)."""
        kept_sets, ids, ranges, index, dropped = [], [], [], [], []
        too_long, left_out = {}, {}
        for j, s in enumerate(self.sets):
            fits = np.array([len(x) + 1 <= block_size for x in self.ids[j]], dtype=bool)
            keep = fits.copy()
            while True:  # a match key or sample with one row left out takes its other rows along
                bad_match = {s.items[k].match for k in np.flatnonzero(~keep)}
                bad_sample = {s.items[k].sample for k in np.flatnonzero(~keep)}
                new = np.array([it.match not in bad_match and it.sample not in bad_sample for it in s.items], bool)
                if (new == keep).all():
                    break
                keep = new
            rows = np.flatnonzero(keep)
            for key, (side_items) in count_keys(s).items():
                too_long[key] = len({s.items[k].sample for k in side_items if not fits[k]})
                left_out[key] = len({s.items[k].sample for k in side_items if not keep[k]})
            kept_sets.append(type(s)(s.name, [s.items[k] for k in rows], s.groups, s.contrasts, s.source))
            ids.append([self.ids[j][k] for k in rows])
            ranges.append([self.ranges[j][k] for k in rows])
            index.append(self.index[j][rows])
            dropped.append(self.dropped[j] + [s.items[k] for k in np.flatnonzero(~keep)])
        kept = Stimuli(kept_sets, ids, ranges, self.contrasts, index, dropped)
        return kept, {"block_size": int(block_size), "too_long": too_long, "left_out": left_out}


def count_keys(s) -> dict[str, list[int]]:
    """The keys `Stimuli.fitting` counts a set's items by, {key: item indices}: the localizer's conditions,
    another set's label levels ('noun'), prefixed '<set>:' unless the set is the shipped 'pos' one."""
    keys: dict[str, list[int]] = {}
    for k, item in enumerate(s.items):
        for factor, level in item.labels.items():
            if s.name == "localizer" and factor != "condition":
                continue
            key = level if s.name in ("localizer", "pos") else f"{s.name}:{factor}={level}"
            keys.setdefault(key, []).append(k)
    return keys


def stimulus_labels(stim: Stimuli) -> list[str]:
    """A name for every stimulus, in `measure_model`'s order (the sets' items, set by set)."""
    return [item.label for s in stim.sets for item in s.items]


def sample_responses(resp: np.ndarray, items: list) -> tuple[np.ndarray, list]:
    """Each sample's response, the mean over its rows (a word over its frames): resp (n_sites, n_rows, C) ->
    ((n_sites, n_samples, C), the first item of each sample), samples in order of first appearance."""
    samples = list(dict.fromkeys(it.sample for it in items))
    if len(samples) == len(items):
        return resp, list(items)
    rows = {key: [] for key in samples}
    for k, it in enumerate(items):
        rows[it.sample].append(k)
    return (np.stack([resp[:, rows[key]].mean(axis=1) for key in samples], axis=1),
            [items[rows[key][0]] for key in samples])


def contrast_sides(stim: Stimuli, resp: np.ndarray) -> tuple[dict, dict, dict]:
    """Each contrast's two sides {name: (a, b)}, each (n_sites, n_samples, n_units), from every item's responses
    resp (n_sites, n_items, n_units) in `stimulus_labels`' order; the samples left out per side {name: (a, b)};
    and the localizer's responses per condition {condition: (n_sites, n_items, n_units)}."""
    per_set, start = {}, 0
    for s in stim.sets:
        per_set[s.name] = (s, *sample_responses(resp[:, start:start + len(s.items)], s.items))
        start += len(s.items)
    dropped = {s.name: d for s, d in zip(stim.sets, stim.dropped)}
    sides, left = {}, {}
    for c in stim.contrasts:
        _, r, firsts = per_set[c.set_name]
        sides[c.name] = tuple(r[:, np.array([c.selects(side, it.labels) for it in firsts], bool)] for side in (0, 1))
        left[c.name] = tuple(len({it.sample for it in dropped[c.set_name] if c.selects(side, it.labels)})
                             for side in (0, 1))
    loc, r, firsts = per_set[stim.localizer.name]
    conditions = {c: r[:, [it.labels.get("condition") == c for it in firsts]] for c in CONDITIONS
                  if any(it.labels.get("condition") == c for it in loc.items + dropped[loc.name])}
    return sides, left, conditions


def stimulus_measures(model, stim: Stimuli, q: float = 0.05, batch_size: int = 32, progress=None,
                      stats: StatisticsKeys | None = None, clusters=None,
                      coords: np.ndarray | None = None) -> tuple[dict, dict]:
    """The per-unit contrasts and response profiles of `measure_model` (see there), from the responses to `stim`,
    and the responses of each contrast's two sides, {contrast: (a, b)}, each (n_sites, n_samples, n_units).

    stats: the FDR's scope and the profile's measure (StatisticsKeys; default this project's). A side
    with fewer than 2 samples leaves its contrast undefined (`welch_t`); the counts of each side
    (n_items_<contrast>) and of the samples `Stimuli.fitting` left out (n_left_out_<contrast>) are kept.
    clusters (topolm.clusters.ClusterKeys) with coords (n_sites, n_units, 2): also the clusters of the
    localizer t-map and their held-out profiles (topolm.clusters.site_clusters).
    Raises UserError for a response that is not a number (`site_responses`)."""
    stats = stats or StatisticsKeys()
    pooled = stats.fdr == "pooled"
    resp = site_responses(model, [x for ids in stim.ids for x in ids], [x for r in stim.ranges for x in r],
                          batch_size=batch_size, progress=progress, labels=stimulus_labels(stim))
    sides, left, loc = contrast_sides(stim, resp)
    out: dict[str, np.ndarray] = {"contrasts": np.array([c.name for c in stim.contrasts]),
                                  "contrast_labels": np.array([c.label for c in stim.contrasts])}
    for name, (a, b) in sides.items():
        t, p = welch_t(a.swapaxes(0, 1), b.swapaxes(0, 1))
        qv, sig = fdr(p, q, pooled)
        out.update({f"t_{name}": t, f"p_{name}": p, f"q_{name}": qv})
        out[f"n_items_{name}"] = np.array([a.shape[1], b.shape[1]])
        out[f"n_left_out_{name}"] = np.array(left[name])
        if name == "localizer":
            out["selective_localizer"] = sig & (t > 0)
        if name == "verb_noun":
            out.update(selective_verb=sig & (t > 0), selective_noun=sig & (t < 0))
    n_sites, n_embed = resp.shape[0], resp.shape[2]
    out["mean_localizer"] = np.stack([loc[c].mean(axis=1) if c in loc and loc[c].shape[1] else
                                      np.full((n_sites, n_embed), np.nan) for c in CONDITIONS], axis=1)
    first = next(iter(loc))
    out["localizer_items"] = np.array([int(it.match) for it, k in zip(stim.localizer.items, stim.index[0])
                                       if it.labels["condition"] == first], dtype=np.int64)

    profiles = response_profiles(loc, q, pooled=pooled, profile=stats.profile)
    out["profile_mean"], out["profile_sem"] = profiles["mean"], profiles["sem"]
    out["profile_n_selected"] = profiles["n_selected"]
    if clusters is not None:
        from topolm.clusters import site_clusters  # clusters build on this module's sheet and statistics

        out.update(site_clusters(out["t_localizer"], loc, coords, clusters, stats.profile))
    return out, sides


def contrast_names(m: dict) -> list[str]:
    """The contrasts measured in `m` (units.npz's `contrasts`; the headline CONTRASTS for arrays without it)."""
    return [str(c) for c in m["contrasts"]] if "contrasts" in m else list(CONTRASTS)

def site_morans(out: dict, sides: dict, s: int, coords: np.ndarray, perms: np.ndarray, permutations: int, seed: int,
                stats: StatisticsKeys, q: float) -> dict[str, object]:
    """Moran's I of site s's t-maps (out: `stimulus_measures`' arrays), with p and shuffled-position null; with
    stats.moran 'significant' the same of the significant units only, with stats.fwhm > 0 the smoothed
    readout and its null (topolm.readout.readout_site). Returns {units.npz key: this site's value}."""
    cells = SheetCells.from_coords(coords)
    values: dict[str, object] = {}
    for contrast in contrast_names(out):
        t = out[f"t_{contrast}"][s]
        m = morans_i(t, coords, permutations, seed, cells=cells)
        values.update({f"moran_{contrast}": m.i, f"moran_p_{contrast}": m.p,
                       f"null_moran_{contrast}": null_morans_i(t, cells, cells.unit_cell[perms])})
        if stats.moran == "significant":
            significant = ~np.isnan(out[f"q_{contrast}"][s]) & (out[f"q_{contrast}"][s] <= q)
            i, p, null = significant_morans_i(t, significant, coords, perms, permutations, seed)
            values.update({f"significant_{contrast}": significant, f"moran_significant_{contrast}": i,
                           f"moran_p_significant_{contrast}": p, f"null_moran_significant_{contrast}": null})
    if stats.fwhm > 0:
        from topolm.readout import readout_site  # readout builds on this module's sheet and statistics

        smoothed = readout_site({c: (a[s], b[s]) for c, (a, b) in sides.items()}, coords, stats.fwhm, perms)
        for contrast, r in smoothed.items():
            values.update({f"t_smoothed_{contrast}": r["t"], f"moran_smoothed_{contrast}": r["i"],
                           f"null_moran_smoothed_{contrast}": r["null"]})
    return values


def measure_model(model, stim: Stimuli, windows: np.ndarray, q: float = 0.05, permutations: int = 999,
                  null_shuffles: int = 100, seed: int = 0, batch_size: int = 32, progress=None,
                  stats: StatisticsKeys | None = None, clusters=None) -> dict:
    """Every measure of one model; returns a dict of numpy arrays (the `units.npz` of analyze.py).

    contrasts, contrast_labels (n_contrasts,): the contrasts run (stim.contrasts, 'localizer' first).
    Per contrast c, site s and unit u: t/p/q_<c> (side a - side b, one sample per item, a target word's
    rows averaged over its frames); selective_localizer (q <= q, t > 0); with verb_noun selective_verb /
    selective_noun; mean_localizer (n_sites, 4, n_units) mean response per condition. Per site:
    moran_<contrast>, moran_p_<contrast>, null_moran_<contrast> (null_shuffles, n_sites),
    profile_mean/profile_sem (n_sites, 4), profile_n_selected (n_sites, 2), corr_centres,
    corr_curve, null_corr_curve (n_sites, n_bins), adjacent_corr, far_corr, null_adjacent_corr,
    null_far_corr, spatial_loss, null_spatial_loss; heldout_samples (tokens behind the correlations);
    n_items_<contrast> and n_left_out_<contrast> (2,) per side, localizer_items (the file's items analysed).
    stats (StatisticsKeys, default this project's): with moran 'significant' also significant_<contrast>
    (n_sites, n_units) bool (FDR q, either sign), moran_significant_<contrast>, moran_p_significant_<contrast>
    (n_sites,), null_moran_significant_<contrast> (null_shuffles, n_sites); with fwhm > 0 also
    t_smoothed_<contrast> (n_sites, n_units), moran_smoothed_<contrast> (n_sites,) and
    null_moran_smoothed_<contrast> (null_shuffles, n_sites) (topolm.readout), and fwhm.
    clusters (topolm.clusters.ClusterKeys, default none): also the cluster arrays of topolm.clusters.site_clusters.
    Raises UserError for a response or held-out activation that is NaN or infinite.
    """
    stats = stats or StatisticsKeys()
    names = list(model.site_names)
    coords = model.sheet.unit_coords.cpu().numpy().astype(np.int64)
    measures, sides = stimulus_measures(model, stim, q, batch_size, progress, stats, clusters, coords)
    out: dict[str, np.ndarray] = {"site_names": np.array(names), "coords": coords, **measures}

    corr, n_samples = heldout_correlations(model, windows)
    rng = np.random.default_rng(seed)
    per_site: dict[str, list] = {k: [] for k in ("corr_curve", "null_corr_curve", "adjacent_corr", "far_corr",
                                                 "null_adjacent_corr", "null_far_corr", "spatial_loss",
                                                 "null_spatial_loss")}
    edges = distance_bin_edges(coords.reshape(-1, 2))
    centres_ = []
    for s in range(len(names)):
        perms = np.stack([rng.permutation(len(coords[s])) for _ in range(null_shuffles)])
        for key, value in site_morans(out, sides, s, coords[s], perms, permutations, seed, stats, q).items():
            per_site.setdefault(key, []).append(value)
        curve = correlation_by_distance(corr[s], coords[s], edges)
        null = null_correlation_by_distance(corr[s], coords[s], perms[:CORRELATION_NULL_SHUFFLES], edges)
        centres_.append(curve["centres"])
        per_site["corr_curve"].append(curve["curve"])
        per_site["null_corr_curve"].append(null["curve"])
        for key in ("adjacent", "far"):
            per_site[f"{key}_corr"].append(curve[key])
            per_site[f"null_{key}_corr"].append(null[key])
        radius, sheet = model.config.radius, model.config.sheet
        per_site["spatial_loss"].append(full_grid_spatial_loss(corr[s], coords[s], radius, sheet))
        per_site["null_spatial_loss"].append(np.mean([full_grid_spatial_loss(corr[s], coords[s][perm], radius, sheet)
                                                      for perm in perms[:CORRELATION_NULL_SHUFFLES]]))
    for key, values in per_site.items():
        arr = np.array(values, dtype=bool if key.startswith("significant_") else np.float64)
        out[key] = arr.T if key.startswith("null_moran") else arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["corr_centres"] = np.nanmean(np.array(centres_), axis=0)
    out["corr_edges"] = edges
    out["heldout_samples"] = np.array(n_samples)
    if stats.fwhm > 0:
        out["fwhm"] = np.array(float(stats.fwhm))
    return out


def _band(x: np.ndarray) -> list[float]:
    x = np.asarray(x)[~np.isnan(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else [math.nan, math.nan]


def defined_mean(x) -> float:
    """The mean of the defined (non-NaN) values; NaN when none is."""
    x = np.asarray(x, np.float64)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else math.nan


def _variant_site(m: dict, variant: str, contrast: str, s: int, reason: str | None) -> dict:
    """summary.json's entry of one site's Moran's I of a variant ('smoothed': the readout, judged against its
    shuffled null; 'significant': the significant units only, with its permutation p), undefined with the reason."""
    i, null = float(m[f"moran_{variant}_{contrast}"][s]), m[f"null_moran_{variant}_{contrast}"][:, s]
    if reason or math.isnan(i):
        entry = {"morans_i": math.nan, "null_i": math.nan, "null_i_95": [math.nan, math.nan],
                 "undefined": reason or "the map on the sheet's cells is constant"}
    else:
        band = _band(null)
        entry = {"morans_i": i, "null_i": defined_mean(null), "null_i_95": band}
        if variant == "smoothed":
            entry.update(p_null=_null_p(i, null), outside_null=bool(i < band[0] or i > band[1]))
    if variant == "significant":
        entry["p"] = math.nan if "undefined" in entry else float(m[f"moran_p_significant_{contrast}"][s])
        entry["n_units"] = int(m[f"significant_{contrast}"][s].sum())
    return entry


def _null_p(i: float, null: np.ndarray) -> float:
    """One-sided p of I against its shuffled null, (1 + #{null >= I}) / (1 + n defined null values)."""
    null = np.asarray(null, np.float64)
    null = null[~np.isnan(null)]
    return float((1 + (null >= i).sum()) / (1 + len(null))) if len(null) and not math.isnan(i) else math.nan


def _variant_mean(m: dict, variant: str, contrast: str, defined: np.ndarray) -> dict:
    """The site mean of a variant's Moran's I over its defined sites, and the null of that mean per shuffle."""
    null = m[f"null_moran_{variant}_{contrast}"]
    null_means = null[:, defined].mean(axis=1) if defined.any() else np.full(1, math.nan)
    i = defined_mean(m[f"moran_{variant}_{contrast}"][defined])
    band = _band(null_means)
    mean = {"morans_i": i, "null_i": defined_mean(null_means), "null_i_95": band,
            "sites_undefined": int((~defined).sum())}
    if variant == "smoothed":
        mean["outside_null"] = bool(not math.isnan(i) and (i < band[0] or i > band[1]))
    return mean


def _variants(m: dict, s: int) -> dict[str, str | None]:
    """The variants of Moran's I measured for site s (see `measure_model`'s stats), each with why it is undefined."""
    found = {}
    for contrast in contrast_names(m):
        if f"moran_smoothed_{contrast}" in m:
            found[("smoothed", contrast)] = undefined_map(m[f"t_smoothed_{contrast}"][s], m.get(f"n_items_{contrast}"),
                                                          m.get(f"n_left_out_{contrast}"))
        if f"moran_significant_{contrast}" in m:
            found[("significant", contrast)] = significant_undefined(m[f"t_{contrast}"][s],
                                                                     m[f"significant_{contrast}"][s], m["coords"][s])
    return found


def summarize(m: dict) -> dict:
    """Per-site and site-averaged numbers of `measure_model`'s arrays (summary.json's per-model part).

    Site means average over sites; the null's 95% band of the site mean comes from the site
    means of each position shuffle. A site whose Moran's I is undefined (`undefined_map`) has
    I, p and null NaN (null in JSON) and its reason under `undefined`; site means and
    `sites_p_below_0.05` take the defined sites only, and `sites_undefined` counts the others.
    Where measured, each contrast has `smoothed` (the readout at m's `fwhm`: I, its shuffled null and
    band, p_null, outside_null; the site mean's `outside_null` and `sites_outside_null`) and
    `significant` (I of the significant units only, p, null, n_units) entries, undefined the same way.
    """
    names = [str(n) for n in m["site_names"]]
    fwhm = float(m["fwhm"]) if "fwhm" in m else 0.0
    reasons = {c: [undefined_map(m[f"t_{c}"][s], m.get(f"n_items_{c}"), m.get(f"n_left_out_{c}"))
                  for s in range(len(names))] for c in contrast_names(m)}
    variants = [_variants(m, s) for s in range(len(names))]
    sites = {}
    for s, name in enumerate(names):
        entry = {}
        for contrast in contrast_names(m):
            null = m[f"null_moran_{contrast}"][:, s]
            entry[contrast] = {"morans_i": float(m[f"moran_{contrast}"][s]), "p": float(m[f"moran_p_{contrast}"][s]),
                               "null_i": defined_mean(null), "null_i_95": _band(null)}
            if reasons[contrast][s] or math.isnan(entry[contrast]["morans_i"]):
                entry[contrast] = {**entry[contrast], "morans_i": math.nan, "p": math.nan, "null_i": math.nan,
                                   "null_i_95": [math.nan, math.nan],
                                   "undefined": reasons[contrast][s] or "the map on the sheet's cells is constant"}
        for (variant, contrast), reason in variants[s].items():
            entry[contrast][variant] = _variant_site(m, variant, contrast, s, reason)
            if variant == "smoothed":
                entry[contrast][variant] = {"fwhm": fwhm, **entry[contrast][variant]}
        entry["fraction_selective"] = float(m["selective_localizer"][s].mean())
        if "selective_verb" in m:
            entry["fraction_verb_selective"] = float(m["selective_verb"][s].mean())
            entry["fraction_noun_selective"] = float(m["selective_noun"][s].mean())
        entry["profile"] = {c: float(v) for c, v in zip(CONDITIONS, m["profile_mean"][s])}
        for key in ("adjacent_corr", "far_corr", "null_adjacent_corr", "null_far_corr", "spatial_loss",
                    "null_spatial_loss"):
            entry[key] = float(m[key][s])
        if "cluster_labels" in m:
            from topolm.clusters import summarize_clusters

            entry["clusters"] = summarize_clusters(m, s)
        sites[name] = entry
    labels = [str(x) for x in m["contrast_labels"]] if "contrast_labels" in m else ["S - N", "verb - noun"]
    return {"contrasts": dict(zip(contrast_names(m), labels)), "sites": sites,
            "mean": _summary_mean(m, sites, names, fwhm)}


def _summary_mean(m: dict, sites: dict, names: list[str], fwhm: float) -> dict:
    """summary.json's `mean`: the site means of `summarize` (see there)."""
    mean = {}
    for contrast in contrast_names(m):
        defined = np.array(["undefined" not in sites[n][contrast] for n in names])
        null_means = m[f"null_moran_{contrast}"][:, defined].mean(axis=1) if defined.any() else np.full(1, math.nan)
        p = m[f"moran_p_{contrast}"][defined]
        mean[contrast] = {"morans_i": defined_mean(m[f"moran_{contrast}"][defined]), "null_i": defined_mean(null_means),
                          "null_i_95": _band(null_means), "sites_p_below_0.05": int((p < 0.05).sum()),
                          "sites_undefined": int((~defined).sum())}
        for variant in ("smoothed", "significant"):
            if f"moran_{variant}_{contrast}" in m:
                entries = [sites[n][contrast][variant] for n in names]
                defined = np.array(["undefined" not in e for e in entries])
                mean[contrast][variant] = _variant_mean(m, variant, contrast, defined)
                if variant == "smoothed":
                    mean[contrast][variant] = {"fwhm": fwhm, **mean[contrast][variant],
                                               "sites_outside_null": sum(bool(e.get("outside_null")) for e in entries)}
    for key in ("adjacent_corr", "far_corr", "null_adjacent_corr", "null_far_corr", "spatial_loss",
                "null_spatial_loss"):
        mean[key] = float(np.mean(m[key]))
    mean["fraction_selective"] = float(m["selective_localizer"].mean())
    if "cluster_labels" in m:
        mean["clusters"] = {"n_positive": sum(sites[n]["clusters"]["n_positive"] for n in names),
                            "n_negative": sum(sites[n]["clusters"]["n_negative"] for n in names)}
    return mean


def _fmt(x) -> str:
    return "undef" if x is None or x != x else f"{x:.3f}"


def option_lines(summary: dict) -> list[str]:
    """Console lines of the variants `summarize` reported (the smoothed readout against its null; Moran's I of
    the significant units only), one per site and the mean; [] when neither was measured."""
    lines = []
    rows = list(summary["sites"].items()) + [("mean", summary["mean"])]
    contrasts = list(summary.get("contrasts", CONTRASTS))
    first = summary["mean"][contrasts[0]]
    if "smoothed" in first:
        lines.append(f"smoothed readout (FWHM {first['smoothed']['fwhm']:g} grid spacings), Moran's I against its null "
                     f"(positions shuffled, then smoothed; 95% band): outside = outside the band")
        for name, e in rows:
            cells = []
            for contrast in contrasts:
                r = e[contrast]["smoothed"]
                lo, hi = r["null_i_95"]
                verdict = "undefined" if "undefined" in r else ("OUTSIDE" if r["outside_null"] else "inside")
                cells.append(f"{contrast} {_fmt(r['morans_i'])} [{_fmt(lo)}, {_fmt(hi)}] {verdict}")
            lines.append(f"  {name:<14}" + "   ".join(cells))
    if "significant" in first:
        lines.append("Moran's I of the significant units only (the others left out), p, units")
        for name, e in rows:
            cells = []
            for contrast in contrasts:
                r = e[contrast]["significant"]
                extra = f" p {_fmt(r['p'])} n {r['n_units']}" if name != "mean" else ""
                cells.append(f"{contrast} {_fmt(r['morans_i'])}{extra}")
            lines.append(f"  {name:<14}" + "   ".join(cells))
            for contrast in contrasts:
                if name != "mean" and "undefined" in e[contrast]["significant"]:
                    lines.append(f"    {contrast} undefined: {e[contrast]['significant']['undefined']}")
    return lines
