"""Layouts, neighborhoods and the spatial loss, against independent plain-numpy versions."""
import numpy as np
import pytest
import torch

from conftest import numpy_spatial_loss
from topolm.position_sets import load_positions, save_positions
from positions import (CorticalSheet, block_cells, centres, check_layout, distance_target, gathered_centred_gram,
                       gram_loss, identity_layout, neighborhood_loss, neighborhood_units, random_layout,
                       spatial_losses)


@pytest.mark.parametrize("side,radius,n_centres", [(28, 5, 400), (28, 10, 100), (12, 3, 64), (6, 2, 16), (5, 3, 1)])
def test_neighborhood_counts(side, radius, n_centres):
    cells = block_cells(side, radius)
    assert cells.shape == (n_centres, (2 * radius - 1) ** 2)
    assert all(len(set(row)) == cells.shape[1] for row in cells)


def test_neighborhoods_follow_coordinates_by_sup_norm():
    side, radius = 10, 3
    coords = random_layout(2, side * side, seed=4)
    units = neighborhood_units(coords, side, radius)
    for s in range(2):
        for c, (cx, cy) in enumerate(centres(side, radius)):
            brute = {u for u in range(side * side)
                     if max(abs(coords[s, u, 0] - cx), abs(coords[s, u, 1] - cy)) < radius}
            assert set(units[s, c].tolist()) == brute


def test_radius_too_large_is_refused():
    with pytest.raises(ValueError, match="too large"):
        block_cells(28, 15)
    block_cells(28, 14)  # a 27 x 27 block still fits


def test_layouts_are_reproducible_permutations():
    a = random_layout(6, 784, seed=1)
    check_layout(a, 6, 784)
    assert np.array_equal(a, random_layout(6, 784, seed=1))
    assert not np.array_equal(a, random_layout(6, 784, seed=2))
    assert not np.array_equal(a[0], a[1])  # independent per site
    ident = identity_layout(2, 784)
    check_layout(ident, 2, 784)
    assert ident[1, 30].tolist() == [1, 2]  # unit u at (u // 28, u % 28)
    broken = a.copy()
    broken[0, 0] = broken[0, 1]
    with pytest.raises(ValueError, match="not a permutation"):
        check_layout(broken, 6, 784)


def test_random_layout_does_not_touch_global_rng():
    state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state()
    random_layout(4, 144, seed=0)
    assert np.array_equal(state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.get_rng_state())


def test_loss_matches_numpy_formula():
    rng = np.random.default_rng(0)
    side, radius, n = 8, 3, 300
    coords = random_layout(1, side * side, seed=3)
    units = neighborhood_units(coords, side, radius)[0]  # (centres, members)
    acts = rng.normal(size=(n, side * side))
    acts[:, ::2] += 0.8 * acts[:, 1::2]  # some structure so the loss is not ~0.5
    picks = [0, 5, 15]
    batch = torch.tensor(np.stack([acts[:, units[c]] for c in picks]), dtype=torch.float32)
    target = torch.tensor(distance_target(radius), dtype=torch.float32)
    m = units.shape[1]
    rows, cols = (torch.as_tensor(t) for t in np.tril_indices(m, k=-1))
    ours = neighborhood_loss(batch, target, rows, cols).numpy()
    expected = [numpy_spatial_loss(acts[:, units[c]], coords[0, units[c]]) for c in picks]
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    assert np.all((ours >= 0) & (ours <= 1))


# The spatial loss of one seeded case, pinned at full float64 precision (as esda's tests pin Moran's I): a
# 3 x 3 sheet (one neighborhood of radius 2) with a random permutation layout, activations with structure.
GOLDEN_SPATIAL_LOSS = 0.537042578653996


def golden_case():
    rng = np.random.default_rng(2025)
    coords = random_layout(1, 9, seed=7)
    acts = rng.normal(size=(64, 9))
    acts[:, 1:] += 0.6 * acts[:, :-1]
    return acts, coords, neighborhood_units(coords, 3, 2)[0, 0]


def test_every_spatial_loss_implementation_gives_the_pinned_value():
    acts, coords, units = golden_case()
    # numpy, float64, from correlations (the analysis, the swap search, init_pos.py)
    numpy_loss = spatial_losses(np.corrcoef(acts, rowvar=False), coords[0], 2)
    assert numpy_loss.shape == (1,) and numpy_loss[0] == pytest.approx(GOLDEN_SPATIAL_LOSS, rel=1e-14, abs=0)
    # torch in float64, the training path's two functions (Gram of the gathered columns, then the loss);
    # EPS in its standard deviations moves the 12th digit
    rows, cols = (torch.as_tensor(t) for t in np.tril_indices(9, k=-1))
    gram = gathered_centred_gram(torch.tensor(acts), torch.as_tensor(units), 1)
    torch_loss = gram_loss(gram, torch.tensor(distance_target(2)), rows, cols)
    assert gram.dtype == torch_loss.dtype == torch.float64
    assert torch_loss.item() == pytest.approx(GOLDEN_SPATIAL_LOSS, rel=0, abs=1e-11)
    # the model's own float32 path
    sheet = CorticalSheet(1, 9, 2, coords)
    grams = sheet.site_gram(torch.tensor(acts, dtype=torch.float32), torch.as_tensor(units), 1)
    assert sheet.loss(grams[None], "mean").item() == pytest.approx(GOLDEN_SPATIAL_LOSS, rel=0, abs=2e-6)
    # the oracle, written from the formula without EPS: EPS in the implementations' Pearson moves the 10th digit
    assert numpy_spatial_loss(acts[:, units], coords[0, units]) == pytest.approx(GOLDEN_SPATIAL_LOSS, rel=0, abs=1e-9)


def sheet_loss(sheet, samples, k, accum):
    """The model's path on already-gathered columns (sites, N, k*m): per-site Gram matrices, then the loss."""
    columns = torch.arange(samples.shape[-1])
    return sheet.loss(torch.stack([sheet.site_gram(x, columns, k) for x in samples]), accum)


def test_sheet_loss_mean_and_max_and_sampling():
    side, radius, k, n = 6, 2, 4, 64
    sheet = CorticalSheet(3, side * side, radius, random_layout(3, side * side, seed=0))
    g = torch.Generator().manual_seed(0)
    units = sheet.sample_units(k, g)
    assert units.shape == (3, k * 9)
    per_site_units = units.view(3, k, 9)
    for s in range(3):  # k distinct neighborhoods per site
        assert len({tuple(sorted(x)) for x in per_site_units[s].tolist()}) == k
    acts = torch.randn(3, n, side * side, dtype=torch.float64)
    samples = torch.stack([acts[s][:, units[s]] for s in range(3)])
    coords = sheet.unit_coords.numpy()
    for accum, reduce in (("mean", np.mean), ("max", np.max)):
        got = sheet_loss(sheet, samples, k, accum).numpy()
        for s in range(3):
            expected = reduce([numpy_spatial_loss(acts[s][:, u].numpy(), coords[s, u.numpy()])
                               for u in per_site_units[s]])
            assert got[s] == pytest.approx(expected, abs=2e-5)


def test_site_gram_gradient_matches_plain_autograd():
    """The one-product backward (and its scatter into shared units) against autograd of the formula."""
    side, radius, k = 6, 2, 5
    sheet = CorticalSheet(1, side * side, radius, random_layout(1, side * side, seed=2)).double()
    units = sheet.sample_units(k, torch.Generator().manual_seed(1))[0]
    assert len(set(units.tolist())) < len(units)  # overlapping neighborhoods share units
    act = torch.randn(2, 24, side * side, dtype=torch.float64, requires_grad=True)
    acts_ref = act.detach().clone().requires_grad_(True)
    ours = sheet.loss(sheet.site_gram(act, units, k)[None], "mean").sum()
    ours.backward()
    cols = acts_ref.reshape(-1, side * side)[:, units].view(-1, k, 9).transpose(0, 1)
    ref = neighborhood_loss(cols, sheet.target, sheet.tril_rows, sheet.tril_cols).mean()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(act.grad, acts_ref.grad)


def test_zero_variance_unit_gives_no_nan():
    side, radius = 5, 2
    sheet = CorticalSheet(1, side * side, radius, random_layout(1, side * side, seed=0))
    samples = torch.randn(1, 32, 9, requires_grad=True)
    dead = torch.zeros(1, 32, 9)
    dead[..., 3] = 1.0  # unit 3 of the neighborhood never varies
    x = samples * (1 - dead) + 0.0 * dead
    loss = sheet_loss(sheet, x, 1, "mean").sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(samples.grad).all()
    flat = sheet_loss(sheet, torch.zeros(1, 32, 9), 1, "mean")  # every unit dead: still a number
    assert torch.isfinite(flat).all()


def test_position_set_roundtrip_and_fit(tmp_path):
    coords = random_layout(4, 36, seed=9)
    save_positions(tmp_path / "set", coords, {"layout": "random", "seed": 9})
    loaded, meta = load_positions(tmp_path / "set", n_layer=2, n_embed=36)
    assert np.array_equal(loaded, coords)
    assert meta["layout"] == "random" and meta["side"] == 6 and meta["sites"][1] == "layer.0.mlp"
    with pytest.raises(ValueError, match="n_layer=2"):
        load_positions(tmp_path / "set", n_layer=3, n_embed=36)
    with pytest.raises(FileNotFoundError):
        load_positions(tmp_path / "nothing", n_layer=2, n_embed=36)
