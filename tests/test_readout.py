"""The fMRI-like readout (topolm.readout) and the paper's statistics options (pooled FDR, Moran's I of the
significant units only, absolute response profiles), on known answers, and analyze.py end to end with them."""
import json
import math

import numpy as np
import pytest
import scipy.stats

import analyze
from positions import random_layout
from topolm import analysis, readout
from conftest import PYTHON, one_error_line, run_in_process, run_main


def _grid(rows, cols):
    u = np.arange(rows * cols)
    return np.stack([u // cols, u % cols], axis=-1)


def _smoothed_null_verdict(i, null):
    """summarize's verdict on one site's smoothed I against its null (True: reported outside the null)."""
    m = {"moran_smoothed_localizer": np.array([i]), "null_moran_smoothed_localizer": np.asarray(null)[:, None]}
    return analysis._variant_site(m, "smoothed", "localizer", 0, None)


# ----------------------------------------------------------------------------- the kernel

def test_a_smoothed_delta_has_its_half_maximum_at_half_the_fwhm_on_a_rectangular_sheet():
    rows, cols = 11, 17
    cells = analysis.SheetCells.from_coords(_grid(rows, cols))
    for fwhm in (2.0, 4.0, 3.0):
        smoother = readout.Smoother(cells, fwhm)
        delta = np.zeros((1, rows * cols))
        delta[0, 5 * cols + 8] = 1.0
        field = smoother.grid(delta)[0]
        sigma = fwhm / math.sqrt(8 * math.log(2))
        assert field.max() == field[5, 8] == pytest.approx(1 / (2 * math.pi * sigma ** 2), rel=1e-12)
        along_rows, along_cols = field[5:, 8] / field[5, 8], field[5, 8:] / field[5, 8]
        np.testing.assert_allclose(along_rows[:5], along_cols[:5], rtol=1e-12)  # isotropic on a non-square grid
        # The kernel is evaluated exactly at grid points, so where FWHM / 2 is a grid distance (fwhm 2 and 4) the
        # profile is exactly one half there (float rounding only). Where it falls between grid points (fwhm 3: 1.5)
        # the log of a Gaussian is exactly a parabola in d, so a parabola through log values at d = 0, 1, 2
        # recovers the half maximum's distance up to rounding as well.
        if fwhm / 2 == int(fwhm / 2):
            assert along_cols[int(fwhm / 2)] == pytest.approx(0.5, rel=1e-12)
            assert along_cols[int(fwhm / 2) - 1] > 0.5 > along_cols[int(fwhm / 2) + 1]
        a, _, c = np.polyfit([0.0, 1.0, 2.0], np.log(along_cols[:3]), 2)
        assert math.sqrt((math.log(0.5) - c) / a) == pytest.approx(fwhm / 2, abs=1e-9)


def test_kernel_mass_is_not_renormalised_at_the_borders():
    mass = readout.kernel_mass(28, 28, 2.0)
    # 1.0000026, 0.7349 and 0.5400: the quoted 1.00 / 0.74 / 0.54 (the edge's 0.7349 within 0.006 of 0.74)
    np.testing.assert_allclose([mass[14, 14], mass[0, 14], mass[0, 0]], [1.00, 0.74, 0.54], atol=0.006)
    np.testing.assert_allclose([mass[14, 14], mass[0, 14], mass[0, 0]], [1.0000026, 0.734861, 0.540019], atol=1e-6)
    g0 = 1 / (math.sqrt(2 * math.pi) * 2 / math.sqrt(8 * math.log(2)))  # the 1-D kernel at 0: 0.4697
    assert mass[0, 14] == pytest.approx((1 + g0) / 2 * mass[14, 14] ** 0.5, rel=1e-6)  # one half-line and the centre
    assert readout.kernel_mass(9, 30, 2.0).shape == (9, 30)
    # Welch's t is scale-invariant per cell, so renormalising the borders would not change a t-map (a mean map dims)
    rng = np.random.default_rng(3)
    coords = _grid(9, 30)
    smoother = readout.Smoother(analysis.SheetCells.from_coords(coords), 2.0)
    a, b = rng.normal(size=(12, 270)) + 0.3, rng.normal(size=(12, 270))
    renormalised = readout.kernel_mass(9, 30, 2.0).reshape(-1)[smoother.flat]
    t = analysis.welch_t(smoother.smooth(a) / renormalised, smoother.smooth(b) / renormalised)[0]
    np.testing.assert_allclose(readout.smoothed_t(smoother, a, b), t, rtol=1e-10)
    corner, inside = smoother.flat.tolist().index(0), smoother.flat.tolist().index(4 * 30 + 15)
    assert smoother.smooth(np.ones((1, 270)))[0, [corner, inside]] == pytest.approx([0.540019, 1.0000026], abs=1e-6)


def test_smoothing_averages_shared_cells_and_gives_empty_cells_no_mass():
    rng = np.random.default_rng(0)
    cells_used = rng.choice(6 * 9, size=30, replace=False)
    unit_cell = np.concatenate([cells_used, rng.choice(cells_used, size=12)])  # 12 units share a cell
    coords = np.stack([unit_cell // 9, unit_cell % 9], axis=-1)
    values = rng.normal(size=(3, len(coords)))
    smoother = readout.Smoother(analysis.SheetCells.from_coords(coords), 2.0, shape=(6, 9))
    sigma = 2.0 / math.sqrt(8 * math.log(2))
    expected = np.zeros((3, 6, 9))
    for cell in np.unique(unit_cell):
        mean = values[:, unit_cell == cell].mean(axis=1)
        for x in range(6):
            for y in range(9):
                d2 = (x - cell // 9) ** 2 + (y - cell % 9) ** 2
                expected[:, x, y] += mean * math.exp(-d2 / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
    np.testing.assert_allclose(smoother.grid(values), expected, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- the readout against its null

def test_smoothed_noise_has_morans_i_near_0_6_and_lies_inside_its_null():
    side = 28
    rng = np.random.default_rng(0)
    coords = random_layout(1, side * side, seed=1)[0]
    a, b = rng.normal(size=(40, side * side)), rng.normal(size=(40, side * side))
    shuffles = np.stack([rng.permutation(side * side) for _ in range(40)])
    r = readout.readout_site({"localizer": (a, b)}, coords, 2.0, shuffles)["localizer"]
    assert 0.55 < r["i"] < 0.65
    assert abs(r["null"].mean() - r["i"]) < 0.03 and 0.55 < r["null"].mean() < 0.65
    verdict = _smoothed_null_verdict(r["i"], r["null"])
    assert verdict["outside_null"] is False and verdict["p_null"] > 0.05
    # the other order, shuffling the smoothed map, destroys the smoothing's autocorrelation: a null near 0
    # that would report this noise as topographic
    cells = analysis.SheetCells.from_coords(coords)
    wrong = analysis.null_morans_i(r["t"], cells, cells.unit_cell[shuffles])
    assert abs(wrong.mean()) < 0.05 and _smoothed_null_verdict(r["i"], wrong)["outside_null"] is True


def test_a_planted_smooth_field_survives_the_readout_well_above_its_null():
    side = 28
    rng = np.random.default_rng(1)
    coords = random_layout(1, side * side, seed=2)[0]
    x, y = coords[:, 0], coords[:, 1]
    field = np.exp(-((x - 8) ** 2 + (y - 9) ** 2) / 40.0) - np.exp(-((x - 19) ** 2 + (y - 18) ** 2) / 40.0)
    a, b = rng.normal(size=(40, side * side)) + 0.5 * field, rng.normal(size=(40, side * side))
    shuffles = np.stack([rng.permutation(side * side) for _ in range(40)])
    r = readout.readout_site({"localizer": (a, b)}, coords, 2.0, shuffles)["localizer"]
    assert r["i"] > 0.8 and r["i"] > np.percentile(r["null"], 97.5) + 0.15
    verdict = _smoothed_null_verdict(r["i"], r["null"])
    assert verdict["outside_null"] is True and verdict["p_null"] == pytest.approx(1 / 41)


# ----------------------------------------------------------------------------- the statistics options

def test_pooled_fdr_is_scipys_over_the_flattened_p_values_of_all_sites():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4, 50)) ** 3
    p[1, 7] = p[3, 0] = np.nan
    adjusted, sig = analysis.fdr(p, 0.05, pooled=True)
    defined = ~np.isnan(p)
    expected = np.full(p.shape, np.nan)
    expected[defined] = scipy.stats.false_discovery_control(p[defined], method="bh")
    np.testing.assert_array_equal(adjusted, expected)
    np.testing.assert_array_equal(sig, defined & (expected <= 0.05))
    assert not np.array_equal(adjusted, analysis.fdr(p, 0.05)[0], equal_nan=True)  # per site is another test


def test_morans_i_of_the_significant_units_only_by_hand():
    # a 3 x 4 sheet; the significant units fill row 0 with t = 1, 2, 3, 4: queen neighbours are left and right,
    # row-standardised (ends: 1, inside: 1/2 each); z = -1.5, -0.5, 0.5, 1.5, lag = -0.5, -0.5, 0.5, 0.5,
    # z'Wz = 2, z'z = 5, n / S0 = 4 / 4: I = 0.4. The other units' t would change it were they included or set to 0.
    coords = _grid(3, 4)
    t = np.array([1.0, 2.0, 3.0, 4.0, -9.0, 7.0, -8.0, 6.0, 5.0, -5.0, 9.0, -7.0])
    significant = np.arange(12) < 4
    rng = np.random.default_rng(0)
    shuffles = np.stack([rng.permutation(12) for _ in range(30)])
    i, p, null = analysis.significant_morans_i(t, significant, coords, shuffles, permutations=99)
    assert i == pytest.approx(0.4, abs=1e-12) and 0 < p <= 1
    assert analysis.morans_i(np.where(significant, t, 0.0), coords, permutations=0).i != pytest.approx(0.4)
    # the null shuffles the significant units among their own cells: I of some ordering of 1..4 on the row
    orderings = {round(analysis.morans_i(np.array(o, float), coords[:4], permutations=0).i, 12)
                 for o in __import__("itertools").permutations([1, 2, 3, 4])}
    assert null.shape == (30,) and {round(float(v), 12) for v in null} <= orderings
    # t = 1, 2, 3 on three cells of a row: each inner lag is 0 and the ends' lags are 0: I = 0, defined
    row3 = np.arange(12) < 3
    assert analysis.significant_undefined(t, row3, coords) is None
    assert analysis.significant_morans_i(t, row3, coords, shuffles, 0)[0] == pytest.approx(0.0, abs=1e-12)


def test_morans_i_of_fewer_than_3_connected_significant_cells_is_undefined():
    coords = _grid(3, 4)
    t = np.arange(12, dtype=float)
    significant = np.isin(np.arange(12), [0, 1, 11])  # two neighbours and an island
    reason = analysis.significant_undefined(t, significant, coords)
    assert reason == ("only 2 of the 3 cells of the 3 significant units have a significant neighbour: Moran's I "
                      "needs at least 3 connected cells")
    i, p, null = analysis.significant_morans_i(t, significant, coords, np.stack([np.arange(12)] * 3), 9)
    assert math.isnan(i) and math.isnan(p) and np.isnan(null).all()
    assert "no unit is significant" in analysis.significant_undefined(t, np.zeros(12, bool), coords)
    entry = analysis._variant_site({"moran_significant_localizer": np.array([i]),
                                    "null_moran_significant_localizer": null[:, None],
                                    "moran_p_significant_localizer": np.array([p]),
                                    "significant_localizer": significant[None]}, "significant", "localizer", 0, reason)
    assert entry["undefined"] == reason and math.isnan(entry["morans_i"]) and entry["n_units"] == 3


def test_response_profile_signed_and_absolute_by_hand():
    # units 0 and 1 prefer S to N (S = 0.5, W = -1, J = 1, N = -2, each +-0.01 in a pattern that averages to 0
    # over either fold's items); units 2-9 are the same pattern in every condition (t = 0, p = 1: never selected)
    n_items = 20
    pattern = np.tile([0.01, 0.01, -0.01, -0.01], n_items // 4)[:, None]
    level = {"S": 0.5, "W": -1.0, "J": 1.0, "N": -2.0}
    resp = {c: np.concatenate([np.repeat(level[c] + pattern, 2, axis=1), np.repeat(pattern, 8, axis=1)], axis=1)
            for c in analysis.CONDITIONS}
    signed = analysis.response_profile(resp)
    absolute = analysis.response_profile(resp, profile="abs")
    assert signed["n_selected"].tolist() == absolute["n_selected"].tolist() == [2, 2]
    np.testing.assert_allclose(signed["mean"], [0.5, -1.0, 1.0, -2.0], atol=1e-12)
    np.testing.assert_allclose(absolute["mean"], [0.5, 1.0, 1.0, 2.0], atol=1e-12)
    both = analysis.response_profiles({c: np.stack([resp[c], -resp[c][:, ::-1]]) for c in resp}, profile="abs")
    np.testing.assert_allclose(both["mean"][0], absolute["mean"], atol=1e-12)
    assert both["n_selected"][1].tolist() == [0, 0]  # the mirrored site prefers N: no unit selected


# ----------------------------------------------------------------------------- analyze.py

def test_analyze_reports_the_smoothed_readout_beside_its_null_and_the_papers_options(gpt2_run, tmp_path):
    out = tmp_path / "fig"
    proc = run_in_process([PYTHON, "analyze.py", f"ckpt={gpt2_run.run}", f"out={out}", "permutations=9",
                           "null_shuffles=12", "heldout_tokens=256", "fwhm=2", "fdr=pooled", "moran=significant",
                           "profile=abs"])
    assert "smoothed readout (FWHM 2 grid spacings)" in proc.stdout
    for contrast in ("localizer", "verb_noun"):
        assert (out / f"{contrast}_maps_smoothed.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    units = np.load(out / "units.npz")
    assert summary["analysis"]["fwhm"] == 2 and float(units["fwhm"]) == 2.0
    model = summary["model"]
    assert units["t_smoothed_localizer"].shape == units["t_localizer"].shape == (4, 36)
    assert units["null_moran_smoothed_verb_noun"].shape == (12, 4)
    np.testing.assert_array_equal(units["q_localizer"].reshape(-1),
                                  scipy.stats.false_discovery_control(units["p_localizer"].reshape(-1)))
    for s, name in enumerate(units["site_names"]):
        for contrast in ("localizer", "verb_noun"):
            entry = model["sites"][name][contrast]
            unsmoothed = analysis.morans_i(units[f"t_{contrast}"][s], units["coords"][s], permutations=9)
            assert entry["morans_i"] == pytest.approx(unsmoothed.i, abs=1e-12)  # the headline stays unsmoothed
            smoothed = entry["smoothed"]
            assert smoothed["fwhm"] == 2
            i = analysis.morans_i(units[f"t_smoothed_{contrast}"][s], units["coords"][s], permutations=0).i
            assert smoothed["morans_i"] == pytest.approx(i, abs=1e-12) != pytest.approx(unsmoothed.i, abs=1e-6)
            null = units[f"null_moran_smoothed_{contrast}"][:, s]
            assert smoothed["null_i"] == pytest.approx(null.mean()) and smoothed["null_i"] > 0.2  # not the null near 0
            lo, hi = smoothed["null_i_95"]
            assert smoothed["outside_null"] == (not lo <= i <= hi)
            significant = entry["significant"]
            assert significant["n_units"] == int((units[f"q_{contrast}"][s] <= 0.05).sum())
        assert all(v >= 0 for v in model["sites"][name]["profile"].values() if v is not None)
    mean = model["mean"]["localizer"]["smoothed"]
    assert mean["sites_outside_null"] == sum(model["sites"][n]["localizer"]["smoothed"]["outside_null"]
                                             for n in units["site_names"])
    assert mean["morans_i"] == pytest.approx(units["moran_smoothed_localizer"].mean())


def test_analyze_refuses_a_negative_fwhm(tmp_path):
    one_error_line(run_main(analyze, ["ckpt=out/none", "fwhm=-1", f"out={tmp_path / 'fig'}"]), "fwhm=-1", ">= 0")
    assert not (tmp_path / "fig").exists()
