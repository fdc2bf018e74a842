"""The analysis figures (topolm/figures.py) drawn from synthetic measures: panel sizes, colour scales, shared
axes, the correlation figure's pair counts, a rectangular sheet."""
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from topolm import figures  # noqa: E402

PANEL_PX = (150, 200)  # a map panel's short and long side at least, in pixels of the saved PNG


def _grid(rows, cols):
    return np.array([(r, c) for r in range(rows) for c in range(cols)])


def _measures(rows=12, cols=12, n_layer=4, seed=0, scale=1.0):
    """The keys the figures read, for 2 * n_layer sites of a rows x cols sheet."""
    rng = np.random.default_rng(seed)
    n_sites, n_units = 2 * n_layer, rows * cols
    coords = np.stack([_grid(rows, cols)] * n_sites)
    t = scale * rng.normal(size=(n_sites, n_units))
    edges = np.arange(0.5, np.hypot(rows - 1, cols - 1) + 1.5, 1.0)
    n_bins = len(edges) - 1
    return {"site_names": np.array([f"layer.{s // 2}.{'attn' if s % 2 == 0 else 'mlp'}" for s in range(n_sites)]),
            "coords": coords, "t_localizer": t, "selective_localizer": t > 1.5, "moran_localizer": rng.random(n_sites),
            "moran_p_localizer": rng.random(n_sites), "null_moran_localizer": 0.02 * rng.normal(size=(50, n_sites)),
            "t_verb_noun": t[:, ::-1].copy(), "selective_verb": t > 1.5, "selective_noun": t < -1.5,
            "moran_verb_noun": rng.random(n_sites), "null_moran_verb_noun": 0.02 * rng.normal(size=(50, n_sites)),
            "corr_edges": edges, "corr_centres": (edges[:-1] + edges[1:]) / 2,
            "corr_curve": rng.random((n_sites, n_bins)), "null_corr_curve": 0.01 * rng.normal(size=(n_sites, n_bins)),
            "profile_mean": scale * rng.normal(size=(n_sites, 4)), "profile_sem": 0.1 * rng.random((n_sites, 4)),
            "profile_n_selected": np.full((n_sites, 2), 10)}


def _loaded(name, n_layer=4, step=1000):
    return SimpleNamespace(name=name, title=f"{name} (step {step})", label=name,
                           model=SimpleNamespace(config=SimpleNamespace(n_layer=n_layer)))


def _pixels(ax):
    box = ax.get_window_extent()  # display pixels at fig.dpi, which save_figure writes the PNG at
    return box.width, box.height


def _map_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_compare_maps_are_large_titled_and_on_one_symmetric_scale():
    contrast = "verb_noun"
    results = [(_loaded("demo-topo"), _measures(seed=0, scale=6.0)), (_loaded("demo-control"), _measures(seed=1))]
    fig = figures.plot_maps(results, contrast, 0.05)
    maps = _map_axes(fig)
    assert len(maps) == 16  # 8 sites x 2 models
    fig.canvas.draw()
    for ax in maps:
        width, height = _pixels(ax)
        assert min(width, height) >= PANEL_PX[0] - 1 and max(width, height) >= PANEL_PX[1] - 1
    limits = {ax.images[0].get_clim() for ax in maps}
    vmax = max(np.abs(m[f"t_{contrast}"]).max() for _, m in results)
    assert limits == {(-vmax, vmax)}  # symmetric around 0 and the same for the model and the control
    title = fig._suptitle.get_text()
    assert "demo-topo (step 1000)" in title and "demo-control (step 1000)" in title
    assert figures.contrast_label(results[0][1], contrast)[0] in title
    bar = [ax for ax in fig.axes if ax not in maps]
    assert len(bar) == 1 and bar[0].get_ylabel().startswith("Welch t")


def test_a_rectangular_sheet_is_drawn_with_its_rows_and_columns():
    m = _measures(rows=4, cols=9, n_layer=2)
    fig = figures.plot_maps([(_loaded("wide", n_layer=2), m)], "localizer", 0.05)
    fig.canvas.draw()
    for ax in _map_axes(fig):
        assert ax.images[0].get_array().shape == (4, 9)
        width, height = _pixels(ax)
        assert width / height == pytest.approx(9 / 4, rel=0.05)
        assert height >= PANEL_PX[0] - 1  # a 4-row sheet's panel is not a sliver
    np.testing.assert_array_equal(figures._sheet_image(m["t_localizer"][0], m["coords"][0]),
                                  m["t_localizer"][0].reshape(4, 9))


def test_the_morans_legend_lies_inside_the_figure_and_off_the_panels():
    results = [(_loaded("demo-topo"), _measures(seed=0)), (_loaded("demo-control"), _measures(seed=1))]
    fig = figures.plot_morans(results)
    fig.canvas.draw()
    legend = (fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()])[0]
    box, page = legend.get_window_extent(), fig.bbox
    assert box.x0 >= page.x0 and box.y0 >= page.y0 and box.x1 <= page.x1 and box.y1 <= page.y1
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent())
    assert "shuffled" in " ".join(t.get_text() for t in legend.get_texts())  # the null's band is in the key


def test_response_profile_panels_share_one_y_scale():
    results = [(_loaded("demo-topo"), _measures(seed=0, scale=5.0)), (_loaded("demo-control"), _measures(seed=1))]
    fig = figures.plot_profile(results)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 8
    fig.canvas.draw()
    assert len({ax.get_ylim() for ax in panels}) == 1
    assert all(panels[0].get_shared_y_axes().joined(panels[0], ax) for ax in panels)


def test_correlation_figure_shows_the_pairs_per_distance_bin():
    m = _measures(rows=5, cols=7, n_layer=2)
    fig = figures.plot_correlation([(_loaded("demo-topo", n_layer=2), m)])
    coords = m["coords"][0]
    rows, cols = np.triu_indices(len(coords), k=1)
    d = np.hypot(*(coords[rows] - coords[cols]).T)
    expected, _ = np.histogram(d, bins=m["corr_edges"])
    assert expected.sum() == len(d) and expected[-1] < expected[0]  # every pair of distinct units lies in a bin
    for s, name in enumerate(m["site_names"]):
        twin = [ax for ax in fig.axes if ax.get_label() == f"pairs {name}"]
        assert len(twin) == 1
        np.testing.assert_array_equal([p.get_height() for p in twin[0].patches], expected)
    assert "Few pairs lie at the largest distances" in fig._suptitle.get_text()
