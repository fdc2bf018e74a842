"""Unit positions on the cortical sheet, neighborhoods, and the spatial loss.

Every spatial site (the output of one attention or MLP sublayer) has `n_embed = rows * cols`
units on a rows x cols sheet (`sheet_shape`: the most square factorisation unless the rows are set;
the paper's 784 is 28 x 28). Cell (x, y) is row x, column y, cell index x * cols + y. A layout
gives each unit integer coordinates (x, y); every grid cell holds exactly one unit, so a layout
is a permutation of the grid, stored as `coords[site, unit] = (x, y)`.
Layouts imported from the research code may break that rule (its pre-optimization left shared
and empty cells). A model keeps such a layout exactly, for sampling and analysis,
but everything below that needs one unit per cell (sampling neighborhoods, hence the spatial
loss, and swap pre-optimization) refuses it with `NOT_A_PERMUTATION`.

A neighborhood is the square (sup-norm) block of cells with max(|x - cx|, |y - cy|) < radius
around a centre whose whole block fits on the grid, i.e. (2r-1)^2 cells. Because each cell holds
one unit, the members of a neighborhood are `cell_to_unit[block cells]`, listed in the block's
own cell order. Two facts follow, and the spatial loss is built on them:
- membership follows the coordinates by construction (recomputed whenever they change), and
- the distance matrix of a neighborhood's members is the same for every neighborhood of every
  site, so the inverse-distance target is one constant vector.

Spatial loss of one neighborhood (TDANN's, Margalit et al. 2024), with r the Pearson correlations of the
members' activations over the samples and D_ij = 1 / (1 + d_ij):
    SL = 0.5 * (1 - Pearson(lower_triangle(r), lower_triangle(D)))
Each site's sampled neighborhoods are evaluated together in batched tensor operations (one
gather and one batched Gram product per site, then one loss over all sites' Gram matrices): no
Python loop over neighborhoods, no boolean masks, nothing that waits on the device.

The formula exists twice: in torch (`gram_loss`, training's sampled loss, differentiable) and in
float64 numpy (`pair_spatial_loss`, and `spatial_losses` over every neighborhood of any layout, shared
or empty cells included), which the analysis, the swap search and init_pos.py's reports use.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

POSITIONS_FORMAT = "topolm-positions-v1"
LAYOUTS = ("random", "identity", "swapopt")
EPS = 1e-8  # keeps a unit with zero variance (or a flat correlation pattern) from giving NaN


def sheet_shape(n_embed: int, rows: int = 0) -> tuple[int, int]:
    """(rows, cols) of the sheet of n_embed units, rows x cols = n_embed.

    rows 0: the most square factorisation, rows <= cols (28 x 28 for 784, 24 x 32 for 768, 6 x 8 for 48;
    a prime width gives 1 x n_embed). Raises ValueError when rows is negative or does not divide n_embed."""
    if n_embed < 1:
        raise ValueError(f"n_embed={n_embed} must be >= 1")
    if rows < 0:
        raise ValueError(f"sheet_rows={rows} must be >= 0 (0: the most square rows x columns of n_embed)")
    if rows == 0:
        rows = max(d for d in range(1, math.isqrt(n_embed) + 1) if n_embed % d == 0)
    if n_embed % rows:
        raise ValueError(f"sheet_rows={rows} does not divide n_embed={n_embed}: the sheet is rows x columns = n_embed "
                         f"units (sheet_rows=0 takes the most square, {'x'.join(map(str, sheet_shape(n_embed)))})")
    return rows, n_embed // rows


def grid(shape: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a grid given as (rows, cols) or as the side of a square."""
    if isinstance(shape, (int, np.integer)):
        return int(shape), int(shape)
    rows, cols = shape
    return int(rows), int(cols)


def site_names(n_layer: int) -> list[str]:
    """Two sites per block, in forward order: the attention and the MLP sublayer."""
    return [f"layer.{i}.{kind}" for i in range(n_layer) for kind in ("attn", "mlp")]


def check_radius(shape: int | tuple[int, int], radius: int) -> int:
    """Number of neighborhood centres on a rows x cols grid (`shape`, or the side of a square); refuses
    radii that do not fit."""
    rows, cols = grid(shape)
    if radius < 1:
        raise ValueError(f"radius={radius} must be >= 1")
    if 2 * radius - 1 > min(rows, cols):
        raise ValueError(
            f"radius={radius} is too large for a {rows}x{cols} grid: a neighborhood spans "
            f"{2 * radius - 1} cells per side (largest radius here: {(min(rows, cols) + 1) // 2})"
        )
    return (rows - 2 * radius + 2) * (cols - 2 * radius + 2)


# ----------------------------------------------------------------------------- layouts

def identity_layout(n_sites: int, n_embed: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Unit u at (u // cols, u % cols) at every site: the paper's no-permutation ablation. shape: the
    sheet's (rows, cols), default `sheet_shape(n_embed)`."""
    rows, cols = shape or sheet_shape(n_embed)
    u = np.arange(n_embed)
    coords = np.stack([u // cols, u % cols], axis=-1)
    return np.broadcast_to(coords, (n_sites, n_embed, 2)).astype(np.int64).copy()


def random_layout(n_sites: int, n_embed: int, seed: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An independent uniform random permutation of the grid per site, from its own generator; shape: the
    sheet's (rows, cols), default `sheet_shape(n_embed)`."""
    rows, cols = shape or sheet_shape(n_embed)
    rng = np.random.default_rng(seed)
    cells = np.stack([rng.permutation(n_embed) for _ in range(n_sites)])
    return np.stack([cells // cols, cells % cols], axis=-1).astype(np.int64)


NOT_A_PERMUTATION = ("the unit positions are not a permutation of the grid (some cells hold several units, "
                     "as in the research code's pre-optimized sets): neighborhoods are defined by one unit per "
                     "cell, so the spatial loss and swap pre-optimization cannot use them; sampling, finetuning "
                     "without the spatial loss (alpha 0) and the analysis can")


def check_layout(coords: np.ndarray, n_sites: int, n_embed: int, permutation: bool = True,
                 shape: tuple[int, int] | None = None) -> None:
    """Refuse coordinates of the wrong shape, off the rows x cols grid (`shape`, default
    `sheet_shape(n_embed)`) or not integers; with `permutation`, also anything that is not one
    permutation of the grid per site."""
    rows, cols = shape or sheet_shape(n_embed)
    coords = np.asarray(coords)
    if coords.shape != (n_sites, n_embed, 2):
        raise ValueError(f"positions have shape {coords.shape}; this model needs {(n_sites, n_embed, 2)}")
    if not np.issubdtype(coords.dtype, np.integer) and not np.array_equal(coords, np.round(coords)):
        raise ValueError("positions are not integer grid cells")
    if coords.min() < 0 or coords[..., 0].max() >= rows or coords[..., 1].max() >= cols:
        raise ValueError(f"positions fall outside the {rows}x{cols} grid")
    if not permutation:
        return
    cells = cells_of(coords.astype(np.int64), (rows, cols))
    for s in range(n_sites):
        if len(np.unique(cells[s])) != n_embed:
            raise ValueError(f"positions of site {s} are not a permutation of the grid (cells repeat)")


def layout_shape(coords: np.ndarray) -> tuple[int, int]:
    """(rows, cols) that integer coordinates (..., 2) span from (0, 0)."""
    coords = np.asarray(coords).reshape(-1, 2)
    return int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1


def is_permutation(coords: np.ndarray, n_embed: int, shape: tuple[int, int] | None = None) -> bool:
    """Whether every site's coordinates (sites, n_embed, 2) put one unit on each cell of the grid: the
    rows x cols grid `shape`, or (None) the grid the coordinates span, which must hold n_embed cells."""
    coords = np.asarray(coords)
    if coords.shape[-2:] != (n_embed, 2) or coords.size == 0 or coords.min() < 0:
        return False
    rows, cols = shape or layout_shape(coords)
    if rows * cols != n_embed or coords[..., 0].max() >= rows or coords[..., 1].max() >= cols:
        return False
    cells = np.sort(cells_of(coords.reshape(-1, n_embed, 2), (rows, cols)), axis=-1)
    return bool((cells == np.arange(n_embed)).all())


def cells_of(coords: np.ndarray, shape: int | tuple[int, int]) -> np.ndarray:
    """Row-major cell index x * cols + y of coordinates (..., 2) on a grid of `shape` (rows, cols) or side."""
    return coords[..., 0] * grid(shape)[1] + coords[..., 1]


def cell_to_unit(coords: np.ndarray, shape: int | tuple[int, int]) -> np.ndarray:
    """Inverse layout: which unit sits at each cell, (sites, cells)."""
    cells = cells_of(np.asarray(coords), shape)
    inverse = np.empty_like(cells)
    np.put_along_axis(inverse, cells, np.arange(cells.shape[-1])[None].repeat(len(cells), 0), axis=-1)
    return inverse


# ----------------------------------------------------------------------------- neighborhoods

def block_offsets(radius: int) -> np.ndarray:
    """(dx, dy) of the (2r-1)^2 cells of a block, row-major."""
    r = np.arange(-(radius - 1), radius)
    dx, dy = np.meshgrid(r, r, indexing="ij")
    return np.stack([dx.ravel(), dy.ravel()], axis=-1)


def centres(shape: int | tuple[int, int], radius: int) -> np.ndarray:
    """All centres whose whole block fits on a rows x cols grid (`shape`, or a square's side):
    cx in [r-1, rows-r], cy in [r-1, cols-r], row-major."""
    rows, cols = grid(shape)
    check_radius((rows, cols), radius)
    cx, cy = np.meshgrid(np.arange(radius - 1, rows - radius + 1), np.arange(radius - 1, cols - radius + 1),
                         indexing="ij")
    return np.stack([cx.ravel(), cy.ravel()], axis=-1)


def block_cells(shape: int | tuple[int, int], radius: int) -> np.ndarray:
    """Cell ids of every neighborhood, (centres, members), members in block order."""
    cells = centres(shape, radius)[:, None, :] + block_offsets(radius)[None, :, :]
    return cells_of(cells, shape)


def neighborhood_units(coords: np.ndarray, shape: int | tuple[int, int], radius: int) -> np.ndarray:
    """Units in every neighborhood of every site, (sites, centres, members), from the coordinates on a
    rows x cols grid (`shape`, or a square's side).

    Raises ValueError (`NOT_A_PERMUTATION`) unless every site's layout is a permutation."""
    rows, cols = grid(shape)
    if not is_permutation(coords, rows * cols, (rows, cols)):
        raise ValueError(NOT_A_PERMUTATION)
    inverse = cell_to_unit(coords, (rows, cols))
    return inverse[:, block_cells((rows, cols), radius)]


def block_distances(radius: int) -> np.ndarray:
    """Grid distance of every pair of a block's cells (lower triangle, `np.tril_indices` order): (P,) float64."""
    xy = block_offsets(radius).astype(np.float64)
    rows, cols = np.tril_indices(len(xy), k=-1)
    return np.sqrt(((xy[rows] - xy[cols]) ** 2).sum(-1))


def distance_target(radius: int) -> np.ndarray:
    """Lower triangle of D = 1 / (1 + d) over a block, centred and scaled to unit norm.

    Pearson(r, D) = <r - mean(r), D'> / |r - mean(r)| once D' is centred and of unit norm, so
    the target is prepared once here.
    """
    target = 1.0 / (1.0 + block_distances(radius))
    if len(target) == 0:  # radius 1: one-unit neighborhoods have no pairs
        return target
    target -= target.mean()
    return target / np.linalg.norm(target)


# ----------------------------------------------------------------------------- the spatial loss in float64 numpy

def pair_spatial_loss(r: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Spatial loss of neighborhoods from their member pairs, in float64 (the numpy twin of `gram_loss`).

    r (..., P): Pearson correlation of every unordered pair of a neighborhood's members; d (..., P), or (P,)
    shared by all: the pairs' grid distances. SL = 0.5 * (1 - Pearson(r, 1 / (1 + d))), with `EPS` added
    to the sum of squares of r's deviations as in `gram_loss`. Returns (...), in [0, 1]; NaN where the
    distances do not vary (fewer than three members, or all on one cell), as the Pearson is undefined."""
    r = np.asarray(r, np.float64)
    target = 1.0 / (1.0 + np.asarray(d, np.float64))  # (P,) stays (P,): a visit's loss is one product
    if r.shape[-1] == 0:
        return np.full(r.shape[:-1], np.nan)
    rc = r - r.mean(axis=-1, keepdims=True)
    tc = target - target.mean(axis=-1, keepdims=True)
    t_norm = np.sqrt(np.einsum("...p,...p->...", tc, tc))
    cross = rc @ tc if tc.ndim == 1 else np.einsum("...p,...p->...", rc, tc)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = cross / (np.sqrt(np.einsum("...p,...p->...", rc, rc) + EPS) * t_norm)
    return np.where(t_norm > 0, 0.5 * (1.0 - pearson), np.nan)


PAIRS_PER_CHUNK = 1 << 21  # pairs gathered at once by `spatial_losses` (a few tens of MB)


def spatial_losses(corr: np.ndarray, coords: np.ndarray, radius: int,
                   shape: tuple[int, int] | None = None) -> np.ndarray:
    """Spatial loss of every neighborhood of every site, in float64, for any layout.

    corr (sites, C, C) unit correlations and coords (sites, C, 2) integer cells -> (sites, centres); or one
    site: (C, C) and (C, 2) -> (centres,). A neighborhood's members are the units whose cells lie in the
    (2r-1)^2 block around a centre (`centres`, on the rows x cols grid `shape`; by default the grid the
    coordinates span when it has C cells, else the most square grid of C cells widened to hold them): for a
    permutation exactly the block's units, otherwise every unit of a shared cell and none of an empty one.
    d are the members' own grid distances (0 between units sharing a cell). NaN as in `pair_spatial_loss`.
    The loss of `CorticalSheet.loss` over all neighborhoods instead of sampled ones, computed from
    correlations instead of activations."""
    corr, coords = np.asarray(corr, np.float64), np.asarray(coords, np.int64)
    if coords.ndim == 2:
        return spatial_losses(corr[None], coords[None], radius, shape)[0]
    if shape is None:  # the grid the coordinates span when it has C cells, else the most square one widened to them
        rows, cols = sheet_shape(coords.shape[1])
        span = layout_shape(coords)
        shape = span if span[0] * span[1] == coords.shape[1] else (max(rows, span[0]), max(cols, span[1]))
    grid_centres = centres(shape, radius)
    return np.stack([_site_spatial_losses(corr[s], coords[s], grid_centres, radius, shape)
                     for s in range(len(coords))])


def _site_spatial_losses(corr: np.ndarray, xy: np.ndarray, grid_centres: np.ndarray, radius: int,
                         shape: tuple[int, int]) -> np.ndarray:
    """`spatial_losses` of one site: neighborhoods with the same number of members are evaluated together."""
    inside = ((np.abs(xy[None, :, 0] - grid_centres[:, None, 0]) < radius)
              & (np.abs(xy[None, :, 1] - grid_centres[:, None, 1]) < radius))  # (centres, units)
    counts = inside.sum(axis=1)
    cell = cells_of(xy, shape)
    out = np.full(len(grid_centres), np.nan)
    for n in np.unique(counts[counts >= 2]):
        which = np.flatnonzero(counts == n)
        members = np.nonzero(inside[which])[1].reshape(len(which), n)
        members = np.take_along_axis(members, np.argsort(cell[members], axis=1, kind="stable"), axis=1)
        rows, cols = np.tril_indices(n, k=-1)
        relative = xy[members] - xy[members[:, :1]]
        shared_shape = bool((relative == relative[:1]).all())  # a permutation: every block alike, d computed once
        d_shared = np.sqrt(((xy[members[0, rows]] - xy[members[0, cols]]) ** 2).sum(-1).astype(np.float64))
        step = max(1, PAIRS_PER_CHUNK // len(rows))
        for start in range(0, len(which), step):
            part = members[start:start + step]
            a, b = part[:, rows], part[:, cols]
            d = d_shared if shared_shape else np.sqrt(((xy[a] - xy[b]) ** 2).sum(-1).astype(np.float64))
            out[which[start:start + step]] = pair_spatial_loss(corr[a, b], d)
    return out


def _centred_gram_forward(act: torch.Tensor, units: torch.Tensor, k: int,
                          row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G (k, m, m), Xc (N, k * m)); see `gathered_centred_gram`."""
    n = act.shape[0]
    xc = torch.gather(act, 1, units.expand(n, -1))  # a new tensor: safe to centre in place
    if xc.dtype in (torch.float16, torch.bfloat16):  # the Gram and correlations need fp32
        xc = xc.float()
    if row_mask is None:
        xc.sub_(xc.mean(dim=0))
    else:
        xc.sub_((xc * row_mask).sum(dim=0) / row_mask.sum().clamp_min(1.0)).mul_(row_mask)
    x3 = xc.view(n, k, -1).transpose(0, 1)
    return x3.transpose(1, 2) @ x3, xc


def _centred_gram_backward(grad: torch.Tensor, xc: torch.Tensor, units: torch.Tensor, n_cols: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """d act (N, n_cols) from dG (k, m, m): dXc_j = Xc_j (dG_j + dG_j^T), added into the units' columns."""
    n, k = xc.shape[0], grad.shape[0]
    dxc = torch.empty_like(xc)  # (N, k * m), written by the product as a strided (k, N, m) view: no copy
    torch.bmm(xc.view(n, k, -1).transpose(0, 1), grad + grad.transpose(1, 2), out=dxc.view(n, k, -1).transpose(0, 1))
    dact = torch.zeros((n, n_cols), dtype=dtype, device=xc.device)
    return dact.index_add_(1, units, dxc.to(dtype))


class GatheredCentredGram(torch.autograd.Function):
    """Eager mode: `_centred_gram_forward` with the one-product backward (see `gathered_centred_gram`)."""

    @staticmethod
    def forward(ctx, act, units, k: int, row_mask=None):
        gram, xc = _centred_gram_forward(act, units, k, row_mask)
        ctx.save_for_backward(xc, units)
        ctx.n_cols, ctx.act_dtype = act.shape[1], act.dtype
        return gram

    @staticmethod
    def backward(ctx, grad):
        xc, units = ctx.saved_tensors
        return _centred_gram_backward(grad, xc, units, ctx.n_cols, ctx.act_dtype), None, None, None


# Under torch.compile the same two functions run as opaque custom ops with a registered autograd
# formula, so inductor never traces into them (see `gathered_centred_gram` for why).
@torch.library.custom_op("topolm::gathered_centred_gram", mutates_args=())
def _gram_op(act: torch.Tensor, units: torch.Tensor, k: int,
             row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _centred_gram_forward(act, units, k, row_mask)


@_gram_op.register_fake
def _(act, units, k, row_mask):
    m = units.shape[0] // k
    dtype = torch.float32 if act.dtype in (torch.float16, torch.bfloat16) else act.dtype
    return act.new_empty((k, m, m), dtype=dtype), act.new_empty((act.shape[0], units.shape[0]), dtype=dtype)


@torch.library.custom_op("topolm::gathered_centred_gram_backward", mutates_args=())
def _gram_backward_op(grad: torch.Tensor, xc: torch.Tensor, units: torch.Tensor, n_cols: int,
                      dtype: torch.dtype) -> torch.Tensor:
    return _centred_gram_backward(grad, xc, units, n_cols, dtype)


@_gram_backward_op.register_fake
def _(grad, xc, units, n_cols, dtype):
    return xc.new_empty((xc.shape[0], n_cols), dtype=dtype)


def _gram_op_setup_context(ctx, inputs, output):
    act, units, _k, _row_mask = inputs
    ctx.save_for_backward(output[1], units)
    ctx.n_cols, ctx.act_dtype = act.shape[1], act.dtype


def _gram_op_backward(ctx, grad, _grad_xc):
    xc, units = ctx.saved_tensors
    return _gram_backward_op(grad, xc, units, ctx.n_cols, ctx.act_dtype), None, None, None


_gram_op.register_autograd(_gram_op_backward, setup_context=_gram_op_setup_context)


def gathered_centred_gram(act: torch.Tensor, units: torch.Tensor, k: int,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Centred Gram matrices of k groups of m columns of one site's activations.

    act (N, C), units (k * m,) long: G_j = Xc_j^T Xc_j, Xc_j the columns units[j*m:(j+1)*m] minus their
    mean over the N rows; returns (k, m, m), float32 for half-precision `act`, else act's dtype.
    On the CPU this is memory-bound, so it makes as few passes over memory as it can:
    - one gather copies the k * m columns into a fresh (N, k * m) buffer, which is centred in place
      and read by the batched product as a strided (k, N, m) view: no further copy;
    - autograd would differentiate the centring and both operands of the product separately (three
      products and several copies). The columns of Xc have zero mean, so the gradient is exactly
      dXc_j = Xc_j (dG_j + dG_j^T): one product, then scattered back into the site's columns
      (index_add: neighborhoods may share units).
    `row_mask` (N, 1) of 0/1, optional: rows with 0 (padding) are left out. The mean runs over the
    kept rows and the left-out rows of Xc are zero, so they add nothing to G; the columns of Xc
    still sum to zero, so the one-product gradient stays exact (and is zero on left-out rows).

    Eager mode runs this as an autograd.Function. Under torch.compile it runs as two custom ops
    (`topolm::gathered_centred_gram` and its backward, `torch.library.custom_op` with
    `register_autograd`), which inductor calls as opaque kernels: the same code as in eager mode.
    Traced into inductor instead, the scatter of the gradient was read before it happened and
    whole sites' spatial gradients were lost: torch 2.13's CPU scheduler, when it re-indexes a
    node to fuse it with one of compatible loop ranges (`SchedulerNode.recompute_size_and_body`),
    recomputes the node's reads from its loop body and drops its renaming of the mutated buffer,
    so the reader of `index_put(zeros, ..., accumulate=True)` is ordered after the zero fill only.
    (Eager mode keeps the Function: a Python custom op costs a few hundred microseconds more per
    call here.)
    """
    if torch.compiler.is_compiling():
        return _gram_op(act, units, k, row_mask)[0]
    return GatheredCentredGram.apply(act, units, k, row_mask)


def gram_loss(gram: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Spatial loss from centred Gram matrices (..., m, m) of the members' activations -> (...) in [0, 1].

    target: (P,) centred unit-norm inverse-distance lower triangle, `rows`/`cols` its indices.
    """
    inv_std = torch.rsqrt(gram.diagonal(dim1=-2, dim2=-1) + EPS)
    corr = gram * inv_std.unsqueeze(-1) * inv_std.unsqueeze(-2)
    r = corr[..., rows, cols]
    r = r - r.mean(dim=-1, keepdim=True)
    pearson = (r * target).sum(-1) * torch.rsqrt((r * r).sum(-1) + EPS)
    return 0.5 * (1.0 - pearson)


def neighborhood_loss(acts: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Spatial loss of neighborhoods batched over leading dims: acts (..., N, m) over N samples -> (...).

    Plain autograd, for reference and for small inputs; training uses `CorticalSheet.site_gram`.
    """
    x = acts.float()
    xc = x - x.mean(dim=-2, keepdim=True)
    return gram_loss(xc.transpose(-1, -2) @ xc, target, rows, cols)


class CorticalSheet(nn.Module):
    """The frozen unit positions of every site, and the sampled spatial loss.

    `unit_coords` is the only persistent buffer, so positions travel inside the model's
    checkpoint; everything else is derived from it and rebuilt whenever it is loaded.
    Coordinates that are not a permutation of the grid (imported research layouts) are kept
    as they are; `permutation` is then False and `sample_units` refuses them.
    """

    def __init__(self, n_sites: int, n_embed: int, radius: int, coords: np.ndarray | None = None, rows: int = 0):
        super().__init__()
        self.n_sites, self.n_embed, self.radius = n_sites, n_embed, radius
        self.shape = sheet_shape(n_embed, rows)  # (rows, cols)
        self.n_centres = check_radius(self.shape, radius)
        self.members = (2 * radius - 1) ** 2
        if coords is None:
            coords = identity_layout(n_sites, n_embed, self.shape)  # placeholder until real positions are set
        check_layout(coords, n_sites, n_embed, permutation=False, shape=self.shape)
        self.permutation = True
        self.register_buffer("unit_coords", torch.as_tensor(np.asarray(coords), dtype=torch.long))
        self.register_buffer("block_cells", torch.as_tensor(block_cells(self.shape, radius)), persistent=False)
        rows, cols = np.tril_indices(self.members, k=-1)
        self.register_buffer("tril_rows", torch.as_tensor(rows), persistent=False)
        self.register_buffer("tril_cols", torch.as_tensor(cols), persistent=False)
        self.register_buffer("target", torch.as_tensor(distance_target(radius), dtype=torch.float32), persistent=False)
        self.register_buffer("cell_to_unit", torch.empty(n_sites, n_embed, dtype=torch.long), persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute neighborhood membership from the coordinates (none without a permutation)."""
        coords = self.unit_coords.cpu().numpy()
        try:
            check_layout(coords, self.n_sites, self.n_embed, permutation=False, shape=self.shape)
        except ValueError as e:
            raise ValueError(f"invalid unit positions: {e}") from e
        self.permutation = is_permutation(coords, self.n_embed, self.shape)
        if self.permutation:
            self.cell_to_unit.copy_(torch.as_tensor(cell_to_unit(coords, self.shape)))
        else:  # a cell may hold several units or none: no unit per cell to look up
            self.cell_to_unit.fill_(-1)

    @torch.no_grad()
    def set_positions(self, coords: np.ndarray) -> None:
        check_layout(coords, self.n_sites, self.n_embed, shape=self.shape)
        self.unit_coords.copy_(torch.as_tensor(np.asarray(coords), dtype=torch.long))
        self.refresh()

    def sample_units(self, k: int, generator: torch.Generator | None = None,
                     sites: list[int] | None = None) -> torch.Tensor:
        """Units of k distinct random neighborhoods per site, (sites, k * members); `sites`: only these
        sites' (indices in site order; None: every site), one row each in that order.

        Raises ValueError (`NOT_A_PERMUTATION`) for a layout that is not a permutation."""
        if not self.permutation:
            raise ValueError(NOT_A_PERMUTATION)
        device = self.cell_to_unit.device
        lookup = self.cell_to_unit if sites is None else self.cell_to_unit[sites]
        scores = torch.rand(len(lookup), self.n_centres, generator=generator, device=device)
        chosen = scores.argsort(dim=-1)[:, :k]
        cells = self.block_cells[chosen].reshape(len(lookup), -1)
        return lookup.gather(1, cells)

    def site_gram(self, act: torch.Tensor, site_units: torch.Tensor, k: int,
                  row_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Centred Gram matrices (k, m, m) of one site's sampled neighborhoods.

        act: the site's activations (..., n_embed); site_units: that site's row of `sample_units`;
        row_mask: optional (rows, 1) 0/1 float over the flattened leading dims, 0 for padding rows.
        Called per site inside the forward pass, so that only these small matrices are stacked,
        never the gathered activations.
        """
        with torch.autocast(device_type=act.device.type, enabled=False):
            return gathered_centred_gram(act.reshape(-1, act.size(-1)), site_units, k, row_mask)

    def loss(self, grams: torch.Tensor, accum: str) -> torch.Tensor:
        """Per-site spatial loss (sites,) from the stacked Gram matrices (sites, k, m, m)."""
        with torch.autocast(device_type=grams.device.type, enabled=False):
            per_nbhd = gram_loss(grams, self.target, self.tril_rows, self.tril_cols)
            return per_nbhd.amax(dim=-1) if accum == "max" else per_nbhd.mean(dim=-1)


