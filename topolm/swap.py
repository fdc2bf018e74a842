"""Swap pre-optimization of a layout ('pre-optimization' in the TopoLM research code's README, after Margalit et al. 2024).
"""
from __future__ import annotations

import numpy as np
import torch

from positions import (EPS, NOT_A_PERMUTATION, block_cells, block_distances, cell_to_unit, distance_target,
                       grid, is_permutation, pair_spatial_loss, sheet_shape)


# ----------------------------------------------------------------------------- swap pre-optimization

def unit_correlations(acts: torch.Tensor) -> np.ndarray:
    """Pearson correlation of every pair of units, per site: (sites, N, C) -> (sites, C, C) float64.

    A unit's correlations do not depend on where it sits, so the swap search computes them once.
    """
    x = acts.double()
    x = x - x.mean(dim=1, keepdim=True)
    gram = x.transpose(1, 2) @ x
    inv_std = torch.rsqrt(gram.diagonal(dim1=1, dim2=2) + EPS)
    return (gram * inv_std[:, :, None] * inv_std[:, None, :]).numpy()


def _visited_losses(corr_flat: np.ndarray, n_embed: int, units: np.ndarray, d: np.ndarray, rows, cols) -> np.ndarray:
    """SL of one neighborhood per site (`positions.pair_spatial_loss`): units (S, m) in block order, d (P,)
    the block's pair distances, corr_flat the flattened (S, C, C) correlations -> (S,)."""
    base = (np.arange(len(units)) * n_embed * n_embed)[:, None]
    return pair_spatial_loss(np.take(corr_flat, base + units[:, rows] * n_embed + units[:, cols]), d)


def swap_optimize(coords: np.ndarray, corr: np.ndarray, radius: int, n_neighborhoods: int, local_steps: int,
                  visit_all: bool, seed: int, progress: bool = False,
                  shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Swap pre-optimization (the research code README's pre-optimization: swaps kept when a neighborhood's loss does not rise), all sites at once.

    Per site: visit `n_neighborhoods` random distinct neighborhoods (or all of them in random
    order), and in each make `local_steps` attempts to swap the cells of two of its units,
    keeping a swap when that neighborhood's spatial loss does not increase (shape: the sheet's (rows, cols)).

    Swapping permutes the members, which leaves the set of pairwise correlations, hence their
    mean and spread, unchanged: only the cross term sum_ij r_ij * D'_ij of the Pearson numerator
    moves, and only in the two swapped rows. Each attempt therefore costs O(members) instead of a
    new correlation matrix.
    Returns the new coordinates and a report: per site and visit, `visited_centres` (sites, visits) and
    the visited neighborhood's `loss_before` / `loss_after` (`positions.pair_spatial_loss`); per attempt
    (visits, local_steps, sites), the two members tried (`first`, `second`: indices into the block) and
    `gain`, the rise of sum_ij r_ij D'_ij (D' the centred inverse distance) that the swap would bring: it
    is kept when gain >= 0, and the loss changes by -gain times a positive factor fixed per visit.
    """
    from tqdm import tqdm

    n_sites, n_embed, _ = coords.shape
    sheet = grid(shape or sheet_shape(n_embed))
    if not is_permutation(coords, n_embed, sheet):
        raise ValueError(NOT_A_PERMUTATION)
    cells = block_cells(sheet, radius)
    n_centres, m = cells.shape
    if not visit_all and not 1 <= n_neighborhoods <= n_centres:
        raise ValueError(f"n_neighborhoods={n_neighborhoods} must be in [1, {n_centres}] for radius {radius} "
                         f"on a {sheet[0]}x{sheet[1]} grid")
    if m < 2:
        raise ValueError(f"radius={radius} gives neighborhoods of one unit: nothing to swap")
    rng = np.random.default_rng(seed)
    n_visits = n_centres if visit_all else n_neighborhoods
    order = np.stack([rng.permutation(n_centres)[:n_visits] for _ in range(n_sites)])
    first = rng.integers(0, m, size=(n_visits, local_steps, n_sites))
    second = (first + rng.integers(1, m, size=first.shape)) % m  # a different member

    rows, cols = np.tril_indices(m, k=-1)
    dist = block_distances(radius)
    target = distance_target(radius)
    weight = np.zeros((m, m))  # centred inverse distance for every ordered pair, as in `target`
    raw = 1.0 / (1.0 + dist)
    weight[rows, cols] = target * np.linalg.norm(raw - raw.mean())
    weight = weight + weight.T

    inverse = cell_to_unit(coords, sheet)
    s = np.arange(n_sites)
    corr_flat = np.ascontiguousarray(corr).reshape(-1)
    site_base = (s * n_embed * n_embed)[:, None]
    before, after = np.empty((n_sites, n_visits)), np.empty((n_sites, n_visits))
    accepted = np.zeros(n_sites, dtype=np.int64)
    gains = np.empty(first.shape)
    for v in tqdm(range(n_visits), desc="swap pre-optimization", unit="nbhd", disable=not progress):
        visit_cells = cells[order[:, v]]
        units = inverse[s[:, None], visit_cells]
        before[:, v] = _visited_losses(corr_flat, n_embed, units, dist, rows, cols)
        row_base = site_base + units
        for step, (a, b) in enumerate(zip(first[v], second[v])):
            ua, ub = units[s, a], units[s, b]
            w = weight[a] - weight[b]
            w[s, a] = w[s, b] = 0.0  # the swapped pair's own correlation does not move
            row_a = np.take(corr_flat, row_base + (ua * n_embed)[:, None])
            row_b = np.take(corr_flat, row_base + (ub * n_embed)[:, None])
            gains[v, step] = ((row_b - row_a) * w).sum(axis=1)
            keep = gains[v, step] >= 0.0
            new_a, new_b = np.where(keep, ub, ua), np.where(keep, ua, ub)
            units[s, a], units[s, b] = new_a, new_b
            row_base[s, a], row_base[s, b] = site_base[:, 0] + new_a, site_base[:, 0] + new_b
            accepted += keep
        inverse[s[:, None], visit_cells] = units
        after[:, v] = _visited_losses(corr_flat, n_embed, units, dist, rows, cols)

    new_coords = np.empty_like(coords)
    unit_cells = np.empty_like(inverse)
    np.put_along_axis(unit_cells, inverse, np.arange(n_embed)[None].repeat(n_sites, 0), axis=1)
    new_coords[..., 0], new_coords[..., 1] = unit_cells // sheet[1], unit_cells % sheet[1]
    report = {"visited_centres": order, "loss_before": before, "loss_after": after, "accepted": accepted,
              "attempts": n_visits * local_steps, "first": first, "second": second, "gain": gains}
    return new_coords, report
