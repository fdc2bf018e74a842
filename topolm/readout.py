"""The fMRI-like readout of a sheet (Rathi et al. 2025): responses smoothed on the sheet, and the null they need.

A voxel of fMRI averages the neurons around it, so the paper reads its model the same way before any
statistic: each stimulus's activation vector at a site is smoothed on the sheet by a Gaussian of full
width at half maximum `fwhm` (in grid spacings; sigma = fwhm / sqrt(8 ln 2)), with weights
exp(-d^2 / (2 sigma^2)) / (2 pi sigma^2), evaluated at every grid point of the rows x columns grid the
layout spans. The weights are not renormalised at the borders: for fwhm 2 the kernel's mass is about
1.00 at the centre, 0.74 at an edge, 0.54 at a corner (`kernel_mass`). Welch's t is scale-invariant, so
t-maps do not feel the missing renormalisation; mean maps would.

The sheet is smoothed as a per-cell field: units that share a cell are averaged into one value first (as
the unsmoothed Moran's I does), an empty cell contributes nothing (as the grid's outside does), and the
smoothed field is read back at the occupied cells, where the statistics are computed (for this project's
layouts, permutations of the grid, every cell holds one unit and this is the whole grid).

Smoothing alone makes a map autocorrelated (Moran's I of smoothed pure noise is about 0.6 on a 28 x 28
sheet), so a smoothed statistic means something only beside the same statistic under shuffled unit
positions, computed in the same order: per shuffle the units' positions are shuffled first, then every
stimulus's vector is smoothed with the shuffled positions, then t and I are recomputed (`readout_site`).
Shuffling an already smoothed map would destroy the smoothing's own autocorrelation and give a null
near 0 that every smoothed map, noise included, lies outside of. The null is computed shuffle by shuffle:
only one shuffle's smoothed responses are held at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse

from topolm.analysis import SheetCells, _moran, welch_t

FWHM_PER_SIGMA = math.sqrt(8 * math.log(2))  # 2.3548: a Gaussian's full width at half maximum in sigmas


def gaussian_1d(n: int, fwhm: float) -> np.ndarray:
    """The 1-D factor of the sheet's kernel on n grid points: (n, n), g[i, j] = exp(-(i - j)^2 / (2 sigma^2))
    / (sqrt(2 pi) sigma), sigma = fwhm / sqrt(8 ln 2). Not renormalised at the ends. Raises ValueError for fwhm <= 0."""
    if not fwhm > 0:
        raise ValueError(f"fwhm={fwhm} must be > 0")
    sigma = fwhm / FWHM_PER_SIGMA
    d = np.subtract.outer(np.arange(n), np.arange(n)).astype(np.float64)
    return np.exp(-d ** 2 / (2 * sigma ** 2)) / (math.sqrt(2 * math.pi) * sigma)


def kernel_mass(rows: int, cols: int, fwhm: float) -> np.ndarray:
    """(rows, cols): the total weight the kernel centred on each grid point puts on the grid (about 1 inside,
    less at the borders, where nothing is renormalised). The 2-D kernel is the product of two 1-D ones."""
    return np.outer(gaussian_1d(rows, fwhm).sum(axis=1), gaussian_1d(cols, fwhm).sum(axis=1))


@dataclass
class Smoother:
    """Gaussian smoothing of one site's unit responses on its rows x columns sheet.

    cells: the layout's occupied cells (analysis.SheetCells); shape: (rows, cols) of the grid, by default
    the span of the occupied cells from (0, 0). `flat` (n_cells,): each occupied cell's index in the
    row-major grid."""
    cells: SheetCells
    fwhm: float
    shape: tuple[int, int] | None = None
    g_rows: np.ndarray = field(init=False)
    g_cols: np.ndarray = field(init=False)
    flat: np.ndarray = field(init=False)

    def __post_init__(self):
        xy = np.asarray(self.cells.cell_xy, np.int64)
        if (xy < 0).any():
            raise ValueError("cell coordinates must be >= 0")
        if self.shape is None:
            self.shape = tuple(int(v) for v in xy.max(axis=0) + 1)
        rows, cols = self.shape
        if (xy[:, 0] >= rows).any() or (xy[:, 1] >= cols).any():
            raise ValueError(f"a cell lies outside the {rows} x {cols} grid")
        self.g_rows, self.g_cols = gaussian_1d(rows, self.fwhm), gaussian_1d(cols, self.fwhm)
        self.flat = xy[:, 0] * cols + xy[:, 1]

    def grid(self, values: np.ndarray, unit_cell: np.ndarray | None = None) -> np.ndarray:
        """The smoothed field at every grid point: values (n, n_units) -> (n, rows, cols) float64.

        unit_cell (n_units,): each unit's cell index (default the layout's; a shuffle passes the shuffled
        one). Units sharing a cell are averaged, empty cells hold no mass."""
        unit_cell = self.cells.unit_cell if unit_cell is None else np.asarray(unit_cell)
        values = np.asarray(values, np.float64)
        n_cells = len(self.cells.cell_xy)
        counts = np.bincount(unit_cell, minlength=n_cells)
        weights = 1.0 / counts[unit_cell]
        assign = scipy.sparse.csr_matrix((weights, (unit_cell, np.arange(len(unit_cell)))),
                                         shape=(n_cells, len(unit_cell)))
        rows, cols = self.shape
        field_ = np.zeros((len(values), rows * cols))
        field_[:, self.flat] = (assign @ values.T).T
        return self.g_rows @ field_.reshape(-1, rows, cols) @ self.g_cols.T

    def smooth(self, values: np.ndarray, unit_cell: np.ndarray | None = None) -> np.ndarray:
        """The smoothed field read at the occupied cells: values (n, n_units) -> (n, n_cells) float64."""
        return self.grid(values, unit_cell).reshape(len(values), -1)[:, self.flat]


def smoothed_t(smoother: Smoother, a: np.ndarray, b: np.ndarray, unit_cell: np.ndarray | None = None) -> np.ndarray:
    """Welch's t (a - b) of the smoothed responses per occupied cell: a (n_a, n_units), b (n_b, n_units) -> (n_cells,)."""
    return welch_t(smoother.smooth(a, unit_cell), smoother.smooth(b, unit_cell))[0]


def readout_site(sides: dict[str, tuple[np.ndarray, np.ndarray]], coords: np.ndarray, fwhm: float,
                 shuffles: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The smoothed readout of one site and its shuffled-position null, for every contrast.

    sides: {contrast: (a (n_a, n_units), b (n_b, n_units))} raw responses of the two sides; coords
    (n_units, 2) integer cells; shuffles (n_shuffles, n_units): shuffle k gives unit u the position of
    unit shuffles[k, u]. Per contrast returns t (n_units,) (each unit reads its cell's smoothed t),
    i (Moran's I of the smoothed t-map on the occupied cells, NaN when undefined) and null
    (n_shuffles,): per shuffle the positions are shuffled, the responses smoothed with them, and t and
    I recomputed; one shuffle's smoothed responses are held at a time."""
    cells = SheetCells.from_coords(coords)
    smoother = Smoother(cells, fwhm)
    out = {}
    for contrast, (a, b) in sides.items():
        t_cell = smoothed_t(smoother, a, b)
        out[contrast] = {"t": t_cell[cells.unit_cell], "i": float(_moran(t_cell, cells.weights, cells.s0)),
                         "null": np.full(len(shuffles), np.nan)}
    for k, perm in enumerate(shuffles):
        unit_cell = cells.unit_cell[perm]
        for contrast, (a, b) in sides.items():
            out[contrast]["null"][k] = _moran(smoothed_t(smoother, a, b, unit_cell), cells.weights, cells.s0)
    return out

