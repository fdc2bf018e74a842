"""Clusters of a site's localizer t-map (Rathi et al. 2025, figures 2a, 8 and 9), and their response profiles.

The procedure (`find_clusters`), on the occupied cells of a site's sheet (units sharing a cell count as
one cell, its t the mean of theirs; topolm.analysis.SheetCells):
1. seed at the cell of the largest t not yet in a cluster; stop when it is below `seed_threshold`;
2. grow over the 4-neighbours (cells sharing an edge) of the cluster: always add the candidate of the
   highest t, while that t is at least `grow_threshold`; a cell already in a cluster is no candidate;
3. remove the cluster from the map and repeat from 1;
4. keep the clusters of at least `min_size` cells (smaller ones are removed all the same).
Negative clusters are the same procedure on -t. With `grow_threshold` 0 (the research code's) cells of
t = 0 join, so a map on a background of zeros floods into one cluster.

A cluster's response profile (`cluster_profiles`) is measured on items that did not find it: in each of
the two folds of topolm.analysis.response_profiles, the clusters of the t-map of one half of the
localizer items (odd, then even) are measured on the other half.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import scipy.stats

from topolm.analysis import CONDITIONS, SheetCells, welch_t
from topolm.config import Checked, require

FOLDS = (("odd", "even"), ("even", "odd"))
"""Each fold's halves of the localizer items: (found on, measured on); item k is odd when k % 2 == 1."""


@dataclass
class ClusterKeys(Checked):
    """The settings of the clusters of the localizer t-map (topolm.clusters; analyze.py's keys)."""
    seed_threshold: float = 1.0
    """Clusters: a cluster is seeded at the largest remaining localizer t (S - N; -t for negative clusters)
    while that t is at least this."""
    grow_threshold: float = 0.0
    """Clusters: a cluster grows by its 4-neighbour of the highest t while that t is at least this (0: cells
    of t = 0 join, the research code's choice)."""
    min_size: int = 25
    """Clusters: clusters of fewer cells (units sharing a cell count as one) are left out (the paper's 25)."""

    def __post_init__(self):
        super().__post_init__()
        require(math.isfinite(self.seed_threshold), f"seed_threshold={self.seed_threshold} must be a number")
        require(math.isfinite(self.grow_threshold), f"grow_threshold={self.grow_threshold} must be a number")
        require(self.grow_threshold <= self.seed_threshold,
                f"grow_threshold={self.grow_threshold} must be <= seed_threshold={self.seed_threshold} "
                f"(a seed must be able to join its own cluster)")
        require(self.min_size >= 1, f"min_size={self.min_size} must be >= 1")


def grow_clusters(grid: np.ndarray, seed_threshold: float = 1.0, grow_threshold: float = 0.0) -> list[np.ndarray]:
    """Every cluster of the greedy procedure (steps 1-3 of the module's docstring) on one polarity.

    grid (rows, cols): t per cell, NaN where no unit sits (never part of a cluster). Ties go to the
    first cell in row-major order. Returns the clusters in the order found, each (n_cells, 2) of
    (row, col), in the order the cells joined; none is dropped for its size."""
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 2:
        raise ValueError(f"grid must be (rows, cols); got {grid.shape}")
    rows, cols = grid.shape
    free = ~np.isnan(grid)
    clusters = []
    while free.any():
        flat = np.where(free, grid, -np.inf).ravel()
        seed = int(np.argmax(flat))  # the first of equal maxima: row-major
        if flat[seed] < seed_threshold:
            break
        members, heap = [], [(-flat[seed], seed)]
        queued = {seed}
        while heap:
            neg, cell = heapq.heappop(heap)
            if members and -neg < grow_threshold:  # the seed always joins: a seed_threshold below grow_threshold
                break
            r, c = divmod(cell, cols)
            free[r, c] = False
            members.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                nxt = rr * cols + cc
                if 0 <= rr < rows and 0 <= cc < cols and free[rr, cc] and nxt not in queued:
                    queued.add(nxt)
                    heapq.heappush(heap, (-grid[rr, cc], nxt))
        clusters.append(np.array(members, dtype=np.int64).reshape(-1, 2))
    return clusters


@dataclass
class Clusters:
    """The clusters of one site's t-map.

    labels (n_units,) int: the unit's positive cluster (1, 2, ... in the order found), else 0;
    negative (n_units,) int: its negative cluster (1, 2, ...), else 0 (a cell of t = 0 may be in
    both under grow_threshold <= 0); sizes / negative_sizes: cells per kept cluster; units /
    negative_units: units per kept cluster."""
    labels: np.ndarray
    negative: np.ndarray
    sizes: list[int]
    negative_sizes: list[int]
    units: list[int]
    negative_units: list[int]

    def members(self, sign: int, k: int) -> np.ndarray:
        """(n_units,) bool: the units of cluster k (1-based) of sign +1 or -1."""
        return (self.labels if sign > 0 else self.negative) == k

    def each(self):
        """(sign, k) of every kept cluster, positive ones first."""
        return [(1, k + 1) for k in range(len(self.sizes))] + [(-1, k + 1) for k in range(len(self.negative_sizes))]


def find_clusters(t: np.ndarray, coords: np.ndarray, keys: ClusterKeys | None = None) -> Clusters:
    """The clusters of one site's t-map (the module's procedure): t (n_units,) per unit, coords (n_units, 2)
    of (row, col) cells of a rows x cols grid (the extent the coordinates span). A unit's cell takes the
    mean t of the units in it (SheetCells); a NaN t is no member of any cluster.
    Returns `Clusters`; raises ValueError for coords that are not (n_units, 2) integer cells."""
    keys = keys or ClusterKeys()
    t = np.asarray(t, np.float64)
    coords = np.asarray(coords)
    if coords.shape != (len(t), 2):
        raise ValueError(f"coords must be (n_units, 2) with n_units = {len(t)}; got {coords.shape}")
    cells = SheetCells.from_coords(coords)
    if (cells.cell_xy < 0).any():
        raise ValueError("coords must be cells of the grid (>= 0)")
    shape = (int(cells.cell_xy[:, 0].max()) + 1, int(cells.cell_xy[:, 1].max()) + 1)
    values = cells.cell_values(t)
    cell_index = np.full(shape, -1, dtype=np.int64)
    cell_index[cells.cell_xy[:, 0], cells.cell_xy[:, 1]] = np.arange(len(cells.cell_xy))
    out = {}
    for sign in (1, -1):
        grid = np.full(shape, np.nan)
        grid[cells.cell_xy[:, 0], cells.cell_xy[:, 1]] = sign * values
        cell_label = np.zeros(len(cells.cell_xy), dtype=np.int64)
        sizes = []
        for found in grow_clusters(grid, keys.seed_threshold, keys.grow_threshold):
            if len(found) >= keys.min_size:
                sizes.append(len(found))
                cell_label[cell_index[found[:, 0], found[:, 1]]] = len(sizes)
        labels = cell_label[cells.unit_cell]
        out[sign] = (labels, sizes, [int((labels == k + 1).sum()) for k in range(len(sizes))])
    return Clusters(out[1][0], out[-1][0], out[1][1], out[-1][1], out[1][2], out[-1][2])


def _interval(per_item: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, s.e.m. and the `level` confidence interval (Student t, n - 1 degrees of freedom) of per-item values."""
    x = np.asarray(per_item, np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    sem = float(scipy.stats.sem(x))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, len(x) - 1)) * sem
    return mean, sem, mean - half, mean + half


def cluster_profiles(responses: dict[str, np.ndarray], coords: np.ndarray, keys: ClusterKeys | None = None,
                     select=("S", "N"), profile: str = "signed") -> list[dict]:
    """Every cluster of one site, found on one half of the localizer items and measured on the other.

    responses: {condition: (n_items, n_units)}, item k of every condition matched (as in
    topolm.analysis.response_profile); coords (n_units, 2). For each fold of `FOLDS`, the t-map of
    select[0] vs select[1] (Welch t) on the finding half gives the clusters (`find_clusters`); each
    cluster's response to an item of the other half is its units' mean activation ('signed') or mean
    absolute activation ('abs'). Returns one dict per cluster: fold, found_on, measured_on (item
    indices), sign (+1, -1), index (1-based within fold and sign), cells, units, and per condition of
    `CONDITIONS` its mean, sem and 95% interval over the measured items (NaN for a condition not in
    `responses`), with per_item (n_conditions, n_measured)."""
    if profile not in ("signed", "abs"):
        raise ValueError(f"profile={profile!r} must be 'signed' or 'abs'")
    n_items = len(responses[select[0]])
    index = np.arange(n_items)
    found_list = []
    for fold, (find_on, measure_on) in enumerate(FOLDS):
        choose = index[index % 2 == (1 if find_on == "odd" else 0)]
        measure = index[index % 2 == (1 if measure_on == "odd" else 0)]
        t, _ = welch_t(np.asarray(responses[select[0]])[choose], np.asarray(responses[select[1]])[choose])
        clusters = find_clusters(t, coords, keys)
        for sign, k in clusters.each():
            units = clusters.members(sign, k)
            per_item = np.full((len(CONDITIONS), len(measure)), np.nan)
            for c, cond in enumerate(CONDITIONS):
                if cond in responses:
                    x = np.asarray(responses[cond], np.float64)[measure][:, units]
                    per_item[c] = (np.abs(x) if profile == "abs" else x).mean(axis=1)
            stats = [_interval(row) for row in per_item]
            sizes = clusters.sizes if sign > 0 else clusters.negative_sizes
            found_list.append({
                "fold": fold, "found_on": choose, "measured_on": measure, "sign": sign, "index": k,
                "cells": int(sizes[k - 1]), "units": int(units.sum()),
                "mean": np.array([s[0] for s in stats]), "sem": np.array([s[1] for s in stats]),
                "ci95": np.array([[s[2], s[3]] for s in stats]), "per_item": per_item})
    return found_list


def site_clusters(t: np.ndarray, loc: dict[str, np.ndarray], coords: np.ndarray, keys: ClusterKeys,
                  profile: str = "signed") -> dict[str, np.ndarray]:
    """units.npz's cluster arrays of every site: t (n_sites, n_units) the localizer t-map (all items), loc
    {condition: (n_sites, n_items, n_units)}, coords (n_sites, n_units, 2).

    cluster_labels / cluster_negative (n_sites, n_units): `find_clusters` on the whole t-map (the map);
    cluster_sizes / cluster_negative_sizes (n_sites, max clusters) cells per cluster, 0-padded; and one
    row per held-out profile (`cluster_profiles`): cluster_profile_site, _fold, _sign, _index, _cells,
    _units (n,), cluster_profile_mean, _sem (n, 4), cluster_profile_ci95 (n, 4, 2)."""
    n_sites = len(t)
    found = [find_clusters(t[s], coords[s], keys) for s in range(n_sites)]
    width = max([1] + [len(c.sizes) for c in found])
    width_neg = max([1] + [len(c.negative_sizes) for c in found])
    out = {"cluster_labels": np.stack([c.labels for c in found]), "cluster_negative": np.stack([c.negative for c in found]),
           "cluster_sizes": np.array([c.sizes + [0] * (width - len(c.sizes)) for c in found], dtype=np.int64),
           "cluster_negative_sizes": np.array([c.negative_sizes + [0] * (width_neg - len(c.negative_sizes))
                                               for c in found], dtype=np.int64),
           "cluster_settings": np.array([keys.seed_threshold, keys.grow_threshold, keys.min_size], np.float64)}
    rows = []
    for s in range(n_sites):
        for p in cluster_profiles({c: r[s] for c, r in loc.items()}, coords[s], keys, profile=profile):
            rows.append((s, p))
    ints = ("site", "fold", "sign", "index", "cells", "units")
    for key in ints:
        out[f"cluster_profile_{key}"] = np.array([s if key == "site" else p[key] for s, p in rows], dtype=np.int64)
    out["cluster_profile_mean"] = np.array([p["mean"] for _, p in rows]).reshape(-1, len(CONDITIONS))
    out["cluster_profile_sem"] = np.array([p["sem"] for _, p in rows]).reshape(-1, len(CONDITIONS))
    out["cluster_profile_ci95"] = np.array([p["ci95"] for _, p in rows]).reshape(-1, len(CONDITIONS), 2)
    return out


def summarize_clusters(m: dict, s: int) -> dict:
    """summary.json's `clusters` of site s from `site_clusters`' arrays: the map's count and sizes per sign,
    and the held-out profiles (per fold, the clusters found on one half, measured on the other)."""
    sizes = [int(x) for x in m["cluster_sizes"][s] if x > 0]
    negative = [int(x) for x in m["cluster_negative_sizes"][s] if x > 0]
    seed, grow, min_size = (float(x) for x in m["cluster_settings"])
    rows = np.flatnonzero(m["cluster_profile_site"] == s)
    profiles = []
    for r in rows:
        fold = int(m["cluster_profile_fold"][r])
        profiles.append({
            "fold": fold, "found_on": f"{FOLDS[fold][0]} localizer items", "measured_on": f"{FOLDS[fold][1]} localizer items",
            "sign": "positive" if m["cluster_profile_sign"][r] > 0 else "negative",
            "index": int(m["cluster_profile_index"][r]), "cells": int(m["cluster_profile_cells"][r]),
            "units": int(m["cluster_profile_units"][r]),
            "profile": {c: {"mean": float(m["cluster_profile_mean"][r, k]), "sem": float(m["cluster_profile_sem"][r, k]),
                            "ci95": [float(x) for x in m["cluster_profile_ci95"][r, k]]}
                        for k, c in enumerate(CONDITIONS)}})
    return {"settings": {"seed_threshold": seed, "grow_threshold": grow, "min_size": int(min_size)},
            "n_positive": len(sizes), "n_negative": len(negative), "positive_sizes": sizes, "negative_sizes": negative,
            "heldout_profiles": profiles}
