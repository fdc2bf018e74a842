"""The analysis measures (topolm/analysis.py) and the stimuli (topolm/stimuli.py): against esda/libpysal, scipy,
hand-worked examples and maps whose answer is known."""
import importlib.util
import math
import re
import warnings

import numpy as np
import pytest
import torch

from topolm import analysis
from topolm import stimuli
from conftest import REPO, numpy_spatial_loss
from model import GPT, GPTConfig
from positions import centres, random_layout, spatial_losses


# ----------------------------------------------------------------------------- stimuli

def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def test_nonwords_are_seeded_distinct_and_not_english():
    wordfreq = stimuli._import_wordfreq()
    first = stimuli.nonwords(150, seed=3)
    assert first == stimuli.nonwords(150, seed=3)
    assert first != stimuli.nonwords(150, seed=4)
    assert len(set(first)) == 150
    for w in first:
        assert re.fullmatch(r"[a-z]{4,9}", w)
        for form in stimuli.nonword_forms(w):
            assert wordfreq.zipf_frequency(form, "en") == 0.0, form
    # the check can fail: the research corpus's "nonce" words are English
    for real in ("dwell", "tarn", "kerf", "blithely"):
        assert stimuli.is_english(real)


def test_shipped_stimuli_are_the_generator_output(tmp_path):
    written = stimuli.write_stimuli(tmp_path)
    for path in written:
        assert path.read_bytes() == (REPO / "stimuli" / path.name).read_bytes(), path.name


def test_localizer_conditions():
    wordfreq = stimuli._import_wordfreq()
    items = stimuli.read_localizer()
    n = len(items["S"])
    assert n >= 80 and all(len(items[c]) == n for c in stimuli.CONDITIONS)
    lengths = [len(_words(t)) for t in items["S"]]
    assert 11 <= np.mean(lengths) <= 13 and min(lengths) >= 10 and max(lengths) <= 14
    function_words = {"the", "a", "an", "and", "it", "because", "had", "their", "every", "could", "not", "that",
                      "while", "until", "after", "before", *stimuli.PREPOSITIONS}
    for s, w, j, nw in zip(*(items[c] for c in stimuli.CONDITIONS)):
        for text in (s, w, j, nw):
            assert text[0].isupper() and text.endswith(".") and "," not in text
        assert sorted(_words(s)) == sorted(_words(w)) and _words(s) != _words(w)
        assert len(_words(j)) == len(_words(s)) == len(_words(nw))
        for a, b in zip(_words(s), _words(j)):
            if a in function_words:
                assert a == b or {a, b} == {"a", "an"}
            else:
                assert wordfreq.zipf_frequency(b, "en") == 0.0, b
        assert all(wordfreq.zipf_frequency(x, "en") == 0.0 for x in _words(nw))
    # every content lemma gets one nonword throughout (jabberwocky keeps a consistent lexicon)
    pairs = {}
    for s, j in zip(items["S"], items["J"]):
        for a, b in zip(_words(s), _words(j)):
            if a not in function_words:
                assert pairs.setdefault(a, b) == b


def test_part_of_speech_set():
    wordfreq = stimuli._import_wordfreq()
    rows = stimuli.read_pos()
    nouns = {r["word"] for r in rows if r["category"] == "noun"}
    verbs = {r["word"] for r in rows if r["category"] == "verb"}
    assert len(nouns) >= 80 and len(verbs) >= 80 and not nouns & verbs
    assert all(wordfreq.zipf_frequency(w, "en") >= 3.0 for w in nouns | verbs)  # common words
    assert len(rows) == len(stimuli.FRAMES) * (len(nouns) + len(verbs))
    from topolm.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    ids, ranges = analysis.tokenize_items([r["text"] for r in rows], enc, [(r["start"], r["end"]) for r in rows])
    for row, x, (a, b) in zip(rows, ids, ranges):
        assert enc.decode(x[a:b]) == " " + row["word"]


def test_init_data_vocabulary_comes_from_the_shared_generator():
    spec = importlib.util.spec_from_file_location("init_data_prepare", REPO / "init-data" / "prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    vocab = prep.vocabulary()
    for words in vocab.values():
        assert not any(stimuli.is_english(w) for w in words)
    import random
    rng = random.Random(0)
    shipped = (REPO / "init-data" / "sentences.txt").read_text().splitlines()
    assert [prep.sentence(rng, vocab) for _ in range(len(shipped))] == shipped
    text = set(_words(" ".join(shipped)))
    assert not text & {"dwell", "tarn", "kerf", "blithely"}


# ----------------------------------------------------------------------------- responses

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embed=16, block_size=32, vocab_size=50304, radius=2,
                    neighborhoods_per_batch=2, alpha=0.0)
    model = GPT(cfg, random_layout(4, 16, seed=1)).eval()
    return model


def test_responses_skip_the_prefix(tiny_model):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, size=n).tolist() for n in (3, 9, 5, 12, 1, 7)]
    ranges = [(0, len(x)) for x in ids]
    ranges[1] = (2, 5)  # a target inside the item
    alone = np.concatenate([analysis.site_responses(tiny_model, [x], [r], batch_size=1) for x, r in zip(ids, ranges)], axis=1)
    batched = analysis.site_responses(tiny_model, ids, ranges, batch_size=4)
    np.testing.assert_array_equal(batched, alone)
    # by hand: the mean over the item's positions after the <|endoftext|> prefix
    big = tiny_model
    resp = analysis.site_responses(big, [ids[3]], [(0, len(ids[3]))])
    acts = big.site_activations(torch.tensor([[analysis.EOT_TOKEN] + ids[3]]))
    for s, name in enumerate(big.site_names):
        np.testing.assert_allclose(resp[s, 0], acts[name][0, 1:].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(resp[s, 0], acts[name][0].mean(0).numpy(), atol=1e-4)  # the prefix is left out
    resp = analysis.site_responses(big, [ids[1]], [(2, 5)])
    acts = big.site_activations(torch.tensor([[analysis.EOT_TOKEN] + ids[1]]))
    np.testing.assert_allclose(resp[0, 0], acts[big.site_names[0]][0, 3:6].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_responses_are_bit_identical_at_every_batch_size():
    # the shipped stimuli (many lengths, targets inside the POS items) through a model of their length
    from topolm.tokenizer import gpt2_encoding
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=16, block_size=64, vocab_size=50304, radius=2,
                          neighborhoods_per_batch=2, alpha=0.0), random_layout(4, 16, seed=1)).eval()
    from topolm import stimsets
    sets = [stimsets.read_shipped_localizer(stimuli.STIMULI_DIR), stimsets.read_shipped_pos(stimuli.STIMULI_DIR)]
    stim = analysis.Stimuli.build(sets, stimsets.select_contrasts(sets, ""), gpt2_encoding())
    ids = stim.ids[0][::4] + stim.ids[1][::4]
    ranges = stim.ranges[0][::4] + stim.ranges[1][::4]
    alone = analysis.site_responses(model, ids, ranges, batch_size=1)
    for batch_size in (7, 32):
        np.testing.assert_array_equal(analysis.site_responses(model, ids, ranges, batch_size=batch_size), alone)


def test_responses_refuse_items_longer_than_the_block(tiny_model):
    with pytest.raises(ValueError, match="block_size"):
        analysis.site_responses(tiny_model, [[1] * 32], [(0, 32)])


# ----------------------------------------------------------------------------- statistics

def test_welch_t_hand_worked():
    a = np.array([1.0, 2.0, 4.0, 5.0])  # mean 3, var 10/3
    b = np.array([2.0, 6.0, 8.0, 9.0, 10.0])  # mean 7, var 10.0
    t, p = analysis.welch_t(a[:, None], b[:, None])
    se = math.sqrt((10 / 3) / 4 + 10.0 / 5)
    df = se ** 4 / (((10 / 3) / 4) ** 2 / 3 + (10.0 / 5) ** 2 / 4)
    from scipy.stats import t as student
    assert t[0] == pytest.approx(-4 / se, rel=1e-12)
    assert p[0] == pytest.approx(2 * student.sf(4 / se, df), rel=1e-9)
    assert t[0] == pytest.approx(-4 / math.sqrt(17 / 6), rel=1e-12)  # -2.3763541031440183
    # undefined, never significant: zero variance in both groups (0/0 and c/0), fewer than 2 items on a side
    t, p = analysis.welch_t(np.ones((4, 3)), np.array([[1.0, 2.0, 1.0]] * 5))
    assert np.isnan(t).all() and np.isnan(p).all()
    t, p = analysis.welch_t(a[:1, None], b[:, None])
    assert np.isnan(t[0]) and np.isnan(p[0])
    t, p = analysis.welch_t(np.array([[1.0, 0.0], [2.0, 1.0]]), np.array([[1.0, 5.0], [2.0, 5.0]]))
    assert t[0] == 0.0 and p[0] == 1.0 and np.isfinite(t[1]) and p[1] < 0.2  # one constant group: t is defined


def test_fdr_hand_worked_per_site():
    # BH step-up: sorted p 0.012, 0.02, 0.035, 0.038, 0.6 -> p * m / rank = 0.06, 0.05, 0.0583, 0.0475, 0.6;
    # the running minimum from the top makes the first four 0.0475: four discoveries at q = 0.05,
    # although 0.012 * 5 = 0.06 > 0.05 (Bonferroni finds none).
    p = np.array([[0.6, 0.035, 0.012, 0.038, 0.02],
                  [0.6, 0.035, 0.012, 0.038, 0.9]])  # another site, corrected on its own:
    # sorted 0.012, 0.035, 0.038, 0.6, 0.9 -> 0.06, 0.0875, 0.0633, 0.75, 0.9 -> running minimum
    # 0.06, 0.0633, 0.0633, 0.75, 0.9: no discovery
    adjusted, sig = analysis.fdr(p, 0.05)
    np.testing.assert_allclose(adjusted[0], [0.6, 0.0475, 0.0475, 0.0475, 0.0475], rtol=1e-12)
    assert sig[0].tolist() == [False, True, True, True, True]
    np.testing.assert_allclose(adjusted[1], [0.75, 0.19 / 3, 0.06, 0.19 / 3, 0.9], rtol=1e-9)
    assert not sig[1].any()
    t = np.array([[1.0, 2.0, -3.0, 4.0, 5.0]])
    assert analysis.selective(t, p[:1]).tolist() == [[False, True, False, True, True]]
    # an undefined p is no discovery and no test: BH runs over the defined units only
    with_undefined = np.array([[0.6, np.nan, 0.035, 0.012, 0.038, np.nan, 0.02]])
    adjusted, sig = analysis.fdr(with_undefined, 0.05)
    np.testing.assert_allclose(adjusted[0, [0, 2, 3, 4, 6]], [0.6, 0.0475, 0.0475, 0.0475, 0.0475], rtol=1e-12)
    assert np.isnan(adjusted[0, [1, 5]]).all() and sig[0].tolist() == [False, False, True, True, True, False, True]
    assert not analysis.selective(np.full((1, 7), np.nan), with_undefined).any()


def test_response_profile_is_cross_validated():
    rng = np.random.default_rng(0)
    n_items, n_units = 40, 30
    level = {"S": 3.0, "W": 2.0, "J": 1.0, "N": 0.0}
    resp = {c: rng.normal(0, 0.3, (n_items, n_units)) for c in analysis.CONDITIONS}
    for c in analysis.CONDITIONS:
        resp[c][:, :8] += level[c]  # units 0-7: language-selective with S > W > J > N
    out = analysis.response_profile(resp)
    assert all(8 <= k <= 10 for k in out["n_selected"])  # the 8 planted units, perhaps a false discovery
    assert out["mean"][0] > out["mean"][1] > out["mean"][2] > out["mean"][3]
    np.testing.assert_allclose(out["mean"] - out["mean"][3], [3, 2, 1, 0], rtol=0.15, atol=0.1)
    # Units that prefer S only on odd items (20-24) and only on even items (25-29): each fold
    # selects units that do not prefer S on the items they are measured on, so S = N there.
    resp = {c: rng.normal(0, 0.3, (n_items, n_units)) for c in analysis.CONDITIONS}
    resp["S"][1::2, 20:25] += 3.0
    resp["S"][0::2, 25:30] += 3.0
    out = analysis.response_profile(resp)
    assert out["n_selected"].tolist() == [5, 5]
    assert abs(out["mean"][0] - out["mean"][3]) < 0.2


# ----------------------------------------------------------------------------- Moran's I

def _grid_coords(side):
    u = np.arange(side * side)
    return np.stack([u // side, u % side], axis=-1)


def _esda(y, w, seed):
    import esda
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return esda.Moran(y, w, permutations=999)


def test_morans_i_matches_esda_on_a_permuted_grid():
    from libpysal.weights import lat2W
    side = 10
    rng = np.random.default_rng(1)
    coords = random_layout(1, side * side, seed=3)[0]
    field = np.add.outer(np.sin(np.arange(side) / 2.0), np.cos(np.arange(side) / 3.0))
    for values_on_grid in (rng.normal(size=(side, side)), field + rng.normal(0, 0.5, (side, side))):
        values = values_on_grid[coords[:, 0], coords[:, 1]]  # unit u reads its own cell
        ours = analysis.morans_i(values, coords, permutations=999, seed=5)
        ref = _esda(values_on_grid.reshape(-1), lat2W(side, side, rook=False), 5)
        assert ours.i == pytest.approx(ref.I, abs=1e-12)
        assert ours.p == ref.p_sim
        assert ours.expected == pytest.approx(ref.EI, abs=1e-15)
        np.testing.assert_allclose(ours.simulated, ref.sim, atol=1e-12)


def test_morans_i_with_empty_and_shared_cells_matches_esda():
    from libpysal.weights import lat2W, w_subset
    side = 8
    rng = np.random.default_rng(2)
    cells = rng.choice(side * side, size=40, replace=False)  # 24 empty cells, some occupied cells isolated
    unit_cells = np.concatenate([cells, rng.choice(cells, size=25)])  # 25 units share a cell with another
    coords = np.stack([unit_cells // side, unit_cells % side], axis=-1)
    values = rng.normal(size=len(coords)) + coords[:, 0] * 0.3
    ours = analysis.morans_i(values, coords, permutations=999, seed=9)
    occupied = np.unique(unit_cells)
    y = np.array([values[unit_cells == c].mean() for c in occupied])
    w = w_subset(lat2W(side, side, rook=False), occupied.tolist(), silence_warnings=True)
    ref = _esda(y, w, 9)
    assert ours.i == pytest.approx(ref.I, abs=1e-12)
    assert ours.p == ref.p_sim


def test_morans_i_on_maps_with_known_answers():
    side = 20
    coords = _grid_coords(side)
    x, y = coords[:, 0], coords[:, 1]
    smooth = np.exp(-((x - 6) ** 2 + (y - 6) ** 2) / 30.0) - np.exp(-((x - 14) ** 2 + (y - 13) ** 2) / 30.0)
    planted = analysis.morans_i(smooth, coords, permutations=999)
    assert planted.i > 0.9 and planted.p == 1 / 1000
    cells = analysis.SheetCells.from_coords(coords)
    rng = np.random.default_rng(0)
    shuffles = cells.unit_cell[np.stack([rng.permutation(side * side) for _ in range(200)])]  # as measure_model
    null = analysis.null_morans_i(smooth, cells, shuffles)
    assert abs(null.mean() - (-1 / (side * side - 1))) < 0.01 and null.std() < 0.06
    stripes = np.where(x % 2 == 0, 1.0, -1.0)  # rows alternate: 2 same-sign and 6 opposite neighbours inside
    i_stripes = analysis.morans_i(stripes, coords, permutations=0).i
    assert -0.5 < i_stripes < -0.45  # -0.480 on 20 x 20 (-0.5 inside, less negative at the border)
    w = analysis.queen_weights(np.unique(coords, axis=0)).toarray()
    z = stripes - stripes.mean()
    assert i_stripes == pytest.approx(z @ w @ z / (z @ z), abs=1e-12)
    # a checkerboard: edge neighbours opposite, corner neighbours alike, so inside the grid the lag is 0;
    # only the border pulls I below 0 (-0.039 on 20 x 20), far from the stripes
    checker = np.where((x + y) % 2 == 0, 1.0, -1.0)
    assert -0.05 < analysis.morans_i(checker, coords, permutations=0).i < 0
    # undefined maps: a constant map (0/0) and a map with an undefined unit have no I and no p (never
    # p = 0.001: an undefined statistic is beaten by no permutation), and their nulls are undefined too
    for undefined in (np.zeros(side * side), np.where(x == 3, np.nan, smooth)):
        m = analysis.morans_i(undefined, coords, permutations=99)
        assert math.isnan(m.i) and math.isnan(m.p)
        rng = np.random.default_rng(0)
        shuffles = np.stack([rng.permutation(len(undefined)) for _ in range(5)])  # as measure_model draws them
        assert np.isnan(analysis.null_morans_i(undefined, cells, shuffles)).all()


def test_queen_weights_are_row_standardised_with_islands():
    cells = np.array([[0, 0], [0, 1], [1, 1], [5, 5]])
    w = analysis.queen_weights(cells).toarray()
    np.testing.assert_allclose(w, [[0, 0.5, 0.5, 0], [0.5, 0, 0.5, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]])


# ----------------------------------------------------------------------------- correlation by distance

def test_correlation_by_distance_hand_worked():
    coords = np.array([[0, 0], [0, 1], [1, 2], [0, 7], [7, 7]])
    corr = np.array([[1.0, 0.8, 0.3, 0.1, 0.05],
                     [0.8, 1.0, 0.6, 0.2, 0.0],
                     [0.3, 0.6, 1.0, -0.1, 0.02],
                     [0.1, 0.2, -0.1, 1.0, 0.4],
                     [0.05, 0.0, 0.02, 0.4, 1.0]])
    out = analysis.correlation_by_distance(corr, coords)
    # adjacent pairs: (0,1) d=1, (1,2) d=sqrt(2); d >= 6: (0,3) 7, (1,3) 6, (2,3) 5.10 no, (0,4) 9.9, (1,4) 9.2,
    # (2,4) 8.6, (3,4) 7
    assert out["adjacent"] == pytest.approx((0.8 + 0.6) / 2)
    assert out["far"] == pytest.approx((0.1 + 0.2 + 0.05 + 0.0 + 0.02 + 0.4) / 6)
    assert out["curve"][0] == pytest.approx(0.7) and out["centres"][0] == pytest.approx((1 + math.sqrt(2)) / 2)
    assert out["counts"].sum() == 10


def test_correlation_falls_with_distance_on_a_planted_sheet():
    side, n = 12, 3000
    rng = np.random.default_rng(0)
    coords = random_layout(1, side * side, seed=4)[0]
    # 16 latent signals, each driving a Gaussian patch of units: neighbours share signals
    centres_ = rng.uniform(0, side, size=(16, 2))
    d2 = ((coords[:, None, :] - centres_[None]) ** 2).sum(-1)
    loadings = np.exp(-d2 / (2 * 1.5 ** 2))
    acts = rng.normal(size=(n, 16)) @ loadings.T + 0.2 * rng.normal(size=(n, side * side))
    acc = analysis.CorrelationAccumulator(1, side * side)
    for chunk in np.array_split(acts, 7):
        acc.add(chunk[None] + 100.0)  # an offset the accumulator must not be thrown by
    corr = acc.correlations()[0]
    np.testing.assert_allclose(corr, np.corrcoef(acts, rowvar=False), atol=1e-9)
    out = analysis.correlation_by_distance(corr, coords)
    assert out["adjacent"] > 0.5 and out["far"] < 0.1 and out["adjacent"] > 5 * max(out["far"], 0.01)
    finite = out["curve"][~np.isnan(out["curve"])]
    assert finite[0] > finite[3] > finite[8]
    shuffles = np.stack([rng.permutation(side * side) for _ in range(5)])
    null = analysis.null_correlation_by_distance(corr, coords, shuffles)
    assert abs(null["adjacent"] - null["far"]) < 0.03


def test_full_grid_spatial_loss_against_the_formula_on_any_layout():
    """positions.spatial_losses, which the analysis uses, against the oracle on raw activations: members by a
    sup-norm search of the coordinates, on a permutation and on a layout with shared and empty cells."""
    side, radius = 8, 2
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(500, 6)) @ rng.normal(size=(6, side * side)) + rng.normal(size=(500, side * side))
    corr = np.corrcoef(acts, rowvar=False)
    coords = random_layout(1, side * side, seed=2)[0]
    shared = coords.copy()
    shared[:3] = shared[3]  # four units on one cell, three cells empty: not a permutation
    for layout in (coords, shared):
        expected = []
        for cx, cy in centres(side, radius):
            members = np.flatnonzero(np.maximum(abs(layout[:, 0] - cx), abs(layout[:, 1] - cy)) < radius)
            expected.append(numpy_spatial_loss(acts[:, members], layout[members]))
        np.testing.assert_allclose(spatial_losses(corr, layout, radius), expected, rtol=0, atol=1e-8)
        assert analysis.full_grid_spatial_loss(corr, layout, radius) == pytest.approx(np.mean(expected), abs=1e-8)
    both = spatial_losses(np.stack([corr, corr]), np.stack([coords, shared]), radius)  # sites batched
    np.testing.assert_array_equal(both, [spatial_losses(corr, coords, radius), spatial_losses(corr, shared, radius)])
    # a sheet whose correlations are exactly the inverse-distance target: loss 0
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
    assert analysis.full_grid_spatial_loss(1 / (1 + d), coords, radius) == pytest.approx(0.0, abs=1e-6)


def test_heldout_windows():
    tokens = np.arange(1000)
    w = analysis.heldout_windows(tokens, 300, 64, seed=1)
    assert w.shape == (5, 64) and (np.diff(w, axis=1) == 1).all() and (w[:, 0] % 64 == 0).all()
    assert np.array_equal(w, analysis.heldout_windows(tokens, 300, 64, seed=1))
    assert analysis.heldout_windows(np.arange(50), 300, 64).shape == (1, 50)
