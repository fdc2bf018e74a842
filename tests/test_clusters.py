"""The clusters of a localizer t-map (topolm.clusters): planted blobs found exactly, the greedy growth equal to
4-connected components above the growth threshold (scipy.ndimage.label), and held-out cluster profiles."""
import numpy as np
import pytest
import scipy.ndimage

from topolm.analysis import CONDITIONS
from topolm.clusters import ClusterKeys, cluster_profiles, find_clusters, grow_clusters, site_clusters, summarize_clusters

ROWS, COLS = 16, 20  # rectangular: rows and columns never swapped


def grid_coords(rows=ROWS, cols=COLS) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1)


def cells_of(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask))}


def cluster_cells(labels: np.ndarray, coords: np.ndarray) -> list[set[tuple[int, int]]]:
    return [{tuple(map(int, xy)) for xy in coords[labels == k]} for k in range(1, labels.max() + 1)]


def planted(seed: int = 0):
    """A t-map with a background in (-0.4, 0.4) (below grow_threshold 0.5 on either sign) and blobs:
    A (5x5) in the top-left corner, B (5x5) touching A only at a corner, C (6x5) negative in the
    bottom-right corner, D (4x6 = 24 cells, one below 25) positive, E (2x2 + a tail) negative and small."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-0.4, 0.4, (ROWS, COLS))
    blobs = {}
    a = np.zeros((ROWS, COLS), bool); a[0:5, 0:5] = True
    b = np.zeros((ROWS, COLS), bool); b[5:10, 5:10] = True
    c = np.zeros((ROWS, COLS), bool); c[10:16, 15:20] = True
    d = np.zeros((ROWS, COLS), bool); d[0:4, 12:18] = True
    e = np.zeros((ROWS, COLS), bool); e[12:14, 2:4] = True; e[14, 3] = True
    for name, mask, sign in (("A", a, 1), ("B", b, 1), ("C", c, -1), ("D", d, 1), ("E", e, -1)):
        t[mask] = sign * rng.uniform(0.6, 4.0, mask.sum())  # every blob cell joins (>= 0.5), some are seeds (>= 1)
        t[mask.nonzero()[0][0], mask.nonzero()[1][0]] = sign * 5.0
        blobs[name] = mask
    return t, blobs


KEYS = ClusterKeys(seed_threshold=1.0, grow_threshold=0.5, min_size=25)


def test_planted_blobs_are_found_exactly():
    t, blobs = planted()
    coords = grid_coords()
    found = find_clusters(t.ravel(), coords, KEYS)
    positive = cluster_cells(found.labels, coords)
    negative = cluster_cells(found.negative, coords)
    # A and B touch at one corner only: two clusters (4-neighbours); D (24 cells) is below min_size
    assert sorted(map(sorted, positive)) == sorted(map(sorted, [cells_of(blobs["A"]), cells_of(blobs["B"])]))
    assert negative == [cells_of(blobs["C"])]  # E (5 cells) dropped, C at two edges found whole
    assert sorted(found.sizes) == [25, 25] and found.negative_sizes == [30]
    assert found.units == found.sizes and found.negative_units == [30]


def test_min_size_boundary_keeps_a_blob_of_exactly_min_size():
    t, blobs = planted()
    keys = ClusterKeys(seed_threshold=1.0, grow_threshold=0.5, min_size=24)
    found = find_clusters(t.ravel(), grid_coords(), keys)
    assert cells_of(blobs["D"]) in cluster_cells(found.labels, grid_coords())
    assert sorted(found.sizes) == [24, 25, 25]


def test_zero_background_floods_into_one_cluster_under_the_default_threshold():
    t, blobs = planted()
    t = np.where(np.abs(t) < 0.5, 0.0, t)  # a background of exact zeros
    coords = grid_coords()
    found = find_clusters(t.ravel(), coords, ClusterKeys())  # grow_threshold 0: zeros join
    positive = cluster_cells(found.labels, coords)
    assert len(positive) == 1
    # every cell of t >= 0 is reachable through the zeros: A, B, D and the background are one cluster
    assert positive[0] == cells_of(t >= 0)
    assert found.sizes == [int((t >= 0).sum())]
    # on -t the zeros flood the same way: one negative cluster of every cell with t <= 0
    assert cluster_cells(found.negative, coords) == [cells_of(t <= 0)]


def test_units_sharing_a_cell_count_as_one_cell():
    t, blobs = planted()
    coords = grid_coords()
    doubled = np.concatenate([coords, coords])  # two units per cell; the cell's t is their mean
    offset = np.random.default_rng(1).uniform(-0.3, 0.3, len(coords))
    found = find_clusters(np.concatenate([t.ravel() + offset, t.ravel() - offset]), doubled, KEYS)
    assert sorted(found.sizes) == [25, 25] and found.negative_sizes == [30]
    assert sorted(found.units) == [50, 50] and found.negative_units == [60]
    assert (found.labels[:len(coords)] == found.labels[len(coords):]).all()


@pytest.mark.parametrize("seed", range(4))
def test_growth_equals_the_connected_components_above_the_growth_threshold(seed):
    """With a fixed growth threshold the greedy growth ends on the 4-connected component of {t >= grow} around
    its seed: the clusters are the components (scipy.ndimage.label) whose maximum reaches the seed threshold."""
    rng = np.random.default_rng(seed)
    t = scipy.ndimage.gaussian_filter(rng.normal(size=(ROWS, COLS)), 1.5) * 6
    keys = ClusterKeys(seed_threshold=1.0, grow_threshold=0.2, min_size=4)
    found = find_clusters(t.ravel(), grid_coords(), keys)
    for sign, labels in ((1, found.labels), (-1, found.negative)):
        comp, n = scipy.ndimage.label(sign * t >= keys.grow_threshold)  # default structure: 4-connectivity
        expected = [cells_of(comp == k) for k in range(1, n + 1)
                    if (sign * t)[comp == k].max() >= keys.seed_threshold and (comp == k).sum() >= keys.min_size]
        got = cluster_cells(labels, grid_coords())
        assert sorted(map(sorted, got)) == sorted(map(sorted, expected))
        assert len(expected) >= 1


def test_growth_adds_the_highest_candidate_first_and_stops_below_the_threshold():
    grid = np.array([[5.0, 1.0, 3.0],
                     [0.1, np.nan, 2.0],
                     [-1.0, 0.9, 0.2]])
    (cluster,) = grow_clusters(grid, seed_threshold=4.0, grow_threshold=0.15)
    # from 5: candidates 1.0, 0.1 -> 1.0; then 3.0, 2.0, 0.2 (under 2.0), 0.9, then 0.1 would be next... all >= 0.15
    assert [tuple(x) for x in cluster] == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1)]
    # the empty cell (NaN) is never part; seeds stop below the seed threshold: no second cluster
    clusters = grow_clusters(grid, seed_threshold=0.05, grow_threshold=0.15)
    assert [[tuple(x) for x in c] for c in clusters[1:]] == [[(1, 0)]]


def test_cluster_keys_are_checked():
    with pytest.raises(ValueError, match="grow_threshold"):
        ClusterKeys(seed_threshold=1.0, grow_threshold=2.0)
    with pytest.raises(ValueError, match="min_size"):
        ClusterKeys(min_size=0)


def localizer_with_blobs(n_items=20, rows=6, cols=7, seed=0):
    """Responses {condition: (n_items, n_units)} where S exceeds N on block `odd` in odd items and on block
    `even` in even items: the clusters found on one half are not those of the other."""
    rng = np.random.default_rng(seed)
    coords = grid_coords(rows, cols)
    odd_block = (coords[:, 0] < 3) & (coords[:, 1] < 3)
    even_block = (coords[:, 0] >= 3) & (coords[:, 1] >= 4)
    resp = {c: rng.normal(size=(n_items, len(coords))) * 0.1 for c in CONDITIONS}
    for k in range(n_items):
        resp["S"][k, odd_block if k % 2 else even_block] += 3.0
        resp["W"][k] += 0.5 * k
    return resp, coords, odd_block, even_block


def test_cluster_profiles_are_measured_on_items_disjoint_from_those_that_found_them():
    resp, coords, odd_block, even_block = localizer_with_blobs()
    keys = ClusterKeys(seed_threshold=3.0, grow_threshold=3.0, min_size=4)
    profiles = cluster_profiles(resp, coords, keys)
    positive = [p for p in profiles if p["sign"] > 0]
    assert [p["fold"] for p in positive] == [0, 1]
    for p, block in zip(positive, (odd_block, even_block)):
        assert set(p["found_on"]).isdisjoint(p["measured_on"])
        assert sorted(np.concatenate([p["found_on"], p["measured_on"]])) == list(range(20))
        assert p["units"] == block.sum() and p["cells"] == block.sum()
        measured = p["measured_on"]
        for c, cond in enumerate(CONDITIONS):
            hand = resp[cond][measured][:, block].mean(axis=1)
            np.testing.assert_allclose(p["per_item"][c], hand, rtol=0, atol=1e-12)
            assert p["mean"][c] == pytest.approx(hand.mean(), abs=1e-12)
            assert p["sem"][c] == pytest.approx(hand.std(ddof=1) / np.sqrt(len(hand)), rel=1e-12)
    # found on odd items, the odd block answers S on the even items like N does: no leak of the finding half
    s, n = CONDITIONS.index("S"), CONDITIONS.index("N")
    assert abs(positive[0]["mean"][s] - positive[0]["mean"][n]) < 0.2
    assert list(positive[0]["measured_on"]) == list(range(0, 20, 2))


def test_cluster_profile_interval_is_the_student_t_interval():
    resp, coords, odd_block, _ = localizer_with_blobs()
    keys = ClusterKeys(seed_threshold=3.0, grow_threshold=3.0, min_size=4)
    p = cluster_profiles(resp, coords, keys, profile="abs")[0]
    w = CONDITIONS.index("W")
    x = np.abs(resp["W"][p["measured_on"]][:, odd_block]).mean(axis=1)
    lo, hi = __import__("scipy.stats").stats.t.interval(0.95, len(x) - 1, loc=x.mean(),
                                                          scale=x.std(ddof=1) / np.sqrt(len(x)))
    np.testing.assert_allclose(p["ci95"][w], [lo, hi], rtol=1e-12)


def test_site_clusters_and_summary_agree_with_find_clusters():
    resp, coords, odd_block, even_block = localizer_with_blobs()
    keys = ClusterKeys(seed_threshold=3.0, grow_threshold=3.0, min_size=4)
    t = np.stack([np.where(odd_block | even_block, 5.0, 0.0), np.where(odd_block, -4.0, 0.0)])
    loc = {c: np.stack([r, r]) for c, r in resp.items()}
    m = site_clusters(t, loc, np.stack([coords, coords]), keys)
    assert m["cluster_sizes"].tolist() == [[9, 9], [0, 0]]
    assert m["cluster_negative_sizes"].tolist() == [[0], [9]]
    summary = summarize_clusters(m, 1)
    assert (summary["n_positive"], summary["n_negative"], summary["negative_sizes"]) == (0, 1, [9])
    assert summary["settings"] == {"seed_threshold": 3.0, "grow_threshold": 3.0, "min_size": 4}
    first = summarize_clusters(m, 0)["heldout_profiles"][0]
    direct = cluster_profiles(resp, coords, keys)[0]
    assert first["profile"]["S"]["mean"] == direct["mean"][0] and first["measured_on"] == "even localizer items"


def test_analyze_reports_the_clusters_of_every_site(gpt2_run, tmp_path):
    import json

    import analyze
    from conftest import run_main

    out = tmp_path / "fig"
    keys = ["seed_threshold=0.5", "grow_threshold=0", "min_size=3"]
    proc = run_main(analyze, [f"ckpt={gpt2_run.ckpt}", f"out={out}", "permutations=9", "null_shuffles=2",
                              "heldout_tokens=256", *keys])
    assert proc.returncode == 0, proc.stderr
    units = np.load(out / "units.npz")
    summary = json.loads((out / "summary.json").read_text())["model"]
    settings = ClusterKeys(seed_threshold=0.5, grow_threshold=0.0, min_size=3)
    total = 0
    for s, name in enumerate(units["site_names"]):
        found = find_clusters(units["t_localizer"][s], units["coords"][s], settings)
        entry = summary["sites"][name]["clusters"]
        assert entry["positive_sizes"] == found.sizes and entry["negative_sizes"] == found.negative_sizes
        np.testing.assert_array_equal(units["cluster_labels"][s], found.labels)
        np.testing.assert_array_equal(units["cluster_negative"][s], found.negative)
        assert entry["settings"] == {"seed_threshold": 0.5, "grow_threshold": 0.0, "min_size": 3}
        for p in entry["heldout_profiles"]:
            assert p["found_on"] != p["measured_on"] and p["cells"] >= 3
            assert set(p["profile"]) == set(CONDITIONS)
        total += entry["n_positive"]
    assert summary["mean"]["clusters"]["n_positive"] == total
    assert (out / "clusters.png").stat().st_size > 5_000
    assert "clusters of the localizer t-map" in proc.stdout
