"""Rectangular sheets (rows x columns = n_embed) and the spatial loss's weight per site and over the steps:
neighborhoods, the sampled loss, the swap search and Moran's I on a rectangular grid against independent
computations; per-site weights and each alpha schedule against their formulas; resume bit-exact across
the schedule's change points; and a Hugging Face GPT-2 of a non-square width made topographic end to end."""
import math
import re
import warnings

import numpy as np
import pytest
import torch

import train
from conftest import random_hf_gpt2, PYTHON, numpy_spatial_loss, overrides, read_checkpoint, read_log, run_in_process
from model import GPT, GPTConfig
from positions import (CorticalSheet, block_offsets, centres, check_layout, is_permutation, neighborhood_units,
                       random_layout, sheet_shape, spatial_losses)
from topolm import analysis
from topolm.swap import swap_optimize, unit_correlations
from topolm.training import alpha_factor_at


# ----------------------------------------------------------------------------- the sheet

@pytest.mark.parametrize("n_embed, rows, want", [(784, 0, (28, 28)), (768, 0, (24, 32)), (48, 0, (6, 8)),
                                                 (36, 0, (6, 6)), (13, 0, (1, 13)), (48, 4, (4, 12)),
                                                 (48, 8, (8, 6))])
def test_the_sheet_is_the_most_square_factorisation_unless_its_rows_are_set(n_embed, rows, want):
    assert sheet_shape(n_embed, rows) == want
    with pytest.raises(ValueError, match="sheet_rows=5 does not divide n_embed=48"):
        sheet_shape(48, 5)


def test_rectangular_neighborhoods_match_a_brute_force_search():
    rows, cols, radius = 5, 9, 2
    coords = random_layout(2, rows * cols, seed=4, shape=(rows, cols))
    check_layout(coords, 2, rows * cols, shape=(rows, cols))
    assert coords[..., 0].max() == rows - 1 and coords[..., 1].max() == cols - 1
    units = neighborhood_units(coords, (rows, cols), radius)
    assert units.shape == (2, (rows - 2) * (cols - 2), 9)
    for s in range(2):
        for c, (cx, cy) in enumerate(centres((rows, cols), radius)):
            brute = {u for u in range(rows * cols)
                     if max(abs(coords[s, u, 0] - cx), abs(coords[s, u, 1] - cy)) < radius}
            assert set(units[s, c].tolist()) == brute
    # the transposed sheet is another grid: these coordinates do not fit it
    assert is_permutation(coords, rows * cols) and not is_permutation(coords, rows * cols, (cols, rows))


def test_the_sampled_loss_on_a_rectangular_sheet_is_the_formula():
    rows, cols, radius, k, n = 4, 12, 2, 5, 80
    sheet = CorticalSheet(2, 48, radius, random_layout(2, 48, seed=1, shape=(rows, cols)), rows=rows).double()
    assert sheet.shape == (4, 12) and sheet.n_centres == 2 * 10
    units = sheet.sample_units(k, torch.Generator().manual_seed(0))
    acts = torch.randn(2, n, 48, dtype=torch.float64)
    grams = torch.stack([sheet.site_gram(acts[s], units[s], k) for s in range(2)])
    per_nbhd = sheet.loss(grams, "max")  # max over neighborhoods: each one's loss is checked through it
    coords = sheet.unit_coords.numpy()
    for s in range(2):
        members = units[s].view(k, -1).numpy()
        for m in members:  # each a 3 x 3 block of the 4 x 12 grid, in block order
            assert np.array_equal(coords[s, m] - coords[s, m[4]], block_offsets(radius))
        want = max(numpy_spatial_loss(acts[s].numpy()[:, m], coords[s, m]) for m in members)
        assert per_nbhd[s].item() == pytest.approx(want, abs=1e-6)  # the target is float32, as in training
    # the full-grid loss of a site is the mean over its 20 neighborhoods, each the formula
    corr = np.corrcoef(acts[0].numpy(), rowvar=False)
    full = spatial_losses(corr, coords[0], radius, (rows, cols))
    grid_units = neighborhood_units(coords[:1], (rows, cols), radius)[0]
    assert len(full) == 20
    np.testing.assert_array_equal(spatial_losses(corr, coords[0], radius), full)  # the grid its coordinates span
    np.testing.assert_allclose(full, [numpy_spatial_loss(acts[0].numpy()[:, m], coords[0, m]) for m in grid_units],
                               atol=1e-10)


def test_swap_search_on_a_rectangular_sheet_keeps_a_permutation_and_lowers_each_visit():
    rows, cols, radius = 4, 12, 2
    rng = np.random.default_rng(0)
    hidden = random_layout(1, 48, seed=9, shape=(rows, cols))[0]
    basis = rng.normal(size=(400, 2))
    acts = basis[:, :1] * np.cos(hidden[:, 0] / 2.0)[None] + basis[:, 1:] * np.sin(hidden[:, 1] / 3.0)[None]
    acts = torch.as_tensor(acts + 0.3 * rng.normal(size=acts.shape))[None].repeat(2, 1, 1)
    start = random_layout(2, 48, seed=1, shape=(rows, cols))
    coords, report = swap_optimize(start, unit_correlations(acts), radius, 10, 20, False, seed=2, shape=(rows, cols))
    check_layout(coords, 2, 48, shape=(rows, cols))  # still one permutation of the 4 x 12 grid per site
    assert (report["loss_after"] <= report["loss_before"] + 1e-12).all() and report["accepted"].min() > 0
    assert (spatial_losses(unit_correlations(acts), coords, radius, (rows, cols)).mean(1)
            < spatial_losses(unit_correlations(acts), start, radius, (rows, cols)).mean(1)).all()


def _esda_i(values_on_grid, rows, cols):
    import esda
    from libpysal.weights import lat2W
    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return esda.Moran(values_on_grid.reshape(-1), lat2W(rows, cols, rook=False), permutations=99)


def test_morans_i_on_a_rectangular_grid_matches_esda():
    rows, cols = 4, 12
    rng = np.random.default_rng(3)
    coords = random_layout(1, 48, seed=5, shape=(rows, cols))[0]
    field = np.add.outer(np.arange(rows) / 2.0, np.sin(np.arange(cols) / 2.0)) + rng.normal(0, 0.3, (rows, cols))
    values = field[coords[:, 0], coords[:, 1]]
    ours = analysis.morans_i(values, coords, permutations=0)
    assert ours.i == pytest.approx(_esda_i(field, rows, cols).I, abs=1e-12)
    # the same 48 values read row by row onto a 12 x 4 lattice are another map
    assert abs(ours.i - _esda_i(field.reshape(cols, rows), cols, rows).I) > 0.1


# ----------------------------------------------------------------------------- weights per site

def test_per_site_weights_sum_the_sites_loss_and_skip_the_sites_of_weight_zero(monkeypatch):
    base = dict(n_layer=2, n_head=2, n_embed=48, sheet_rows=4, radius=2, neighborhoods_per_batch=3, block_size=16,
                vocab_size=64)
    assert GPTConfig(**base, alpha=2.0, alpha_mlp=0.0).site_alpha == [2.0, 0.0, 2.0, 0.0]
    assert GPTConfig(**base, alpha=2.0, alpha_attn=0.5).site_alpha == [0.5, 2.0, 0.5, 2.0]
    assert GPTConfig(**base, alpha_sites=[1, 0, 3, 0]).scaled_alpha(0.5)["alpha_sites"] == [0.5, 0.0, 1.5, 0.0]
    torch.manual_seed(0)
    every = GPT(GPTConfig(**base, alpha=1.0), random_layout(4, 48, 0, (4, 12)))
    some = GPT(GPTConfig(**base, alpha_sites=[1.5, 0.0, 3.0, 0.0]), random_layout(4, 48, 0, (4, 12)))
    some.load_state_dict(every.state_dict())
    assert some.spatial_sites == [0, 2] and re.fullmatch(r"a-[0-9a-f]{8}", some.config.alpha_label())
    units = every.sample_units(torch.Generator().manual_seed(1))
    assert some.sample_units(torch.Generator().manual_seed(1)).shape == (2, units.shape[1])
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    _, all_sites = every(x, x, units=units)
    calls = []
    site_gram = some.sheet.site_gram
    monkeypatch.setattr(some.sheet, "site_gram", lambda *a, **k: calls.append(1) or site_gram(*a, **k))
    _, losses = some(x, x, units=units[[0, 2]])
    assert len(calls) == 2  # no neighborhood of the sites of weight 0 is gathered or correlated
    assert losses.per_site[[1, 3]].tolist() == [0.0, 0.0]
    assert torch.equal(losses.per_site[[0, 2]], all_sites.per_site[[0, 2]])
    want = 1.5 * all_sites.per_site[0] + 3.0 * all_sites.per_site[2]
    assert losses.spatial.item() == pytest.approx(want.item(), rel=1e-6)
    some.set_alpha_factor(0.25)
    assert some(x, x, units=units[[0, 2]])[1].spatial.item() == pytest.approx(0.25 * want.item(), rel=1e-6)


# ----------------------------------------------------------------------------- weights over the steps

class Schedule:
    def __init__(self, alpha_schedule, alpha_warmup_iters=0, alpha_decay_iters=0, alpha_final=0.0):
        self.alpha_schedule, self.alpha_warmup_iters = alpha_schedule, alpha_warmup_iters
        self.alpha_decay_iters, self.alpha_final = alpha_decay_iters, alpha_final


@pytest.mark.parametrize("schedule, steps, want", [
    (Schedule("constant"), [0, 5, 10**6], [1.0, 1.0, 1.0]),
    (Schedule("linear", 4), [0, 1, 2, 3, 4, 9], [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
    # warm-up over 2 steps, then a cosine from 1 at step 2 to 0.1 at step 10: its midpoint 6 at 0.55
    (Schedule("cosine", 2, 10, 0.1), [0, 1, 2, 4, 6, 10, 50],
     [0.0, 0.5, 1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55, 0.1, 0.1]),
    (Schedule("cosine", 0, 4, 0.0), [0, 1, 2, 3, 4], [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                     (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
])
def test_each_schedule_follows_its_formula(schedule, steps, want):
    assert [alpha_factor_at(it, schedule) for it in steps] == pytest.approx(want, abs=1e-15)


def schedule_args(data, out, **kw):
    keys = {**dict(dataset=str(data), out_dir=str(out), max_iters=8, eval_interval=100, save_interval=100,
                   dropout=0.1, alpha=2.0, alpha_mlp=0.5, alpha_schedule="cosine", alpha_warmup_iters=4,
                   alpha_decay_iters=7, alpha_final=0.25), **kw}
    return [PYTHON, "train.py", "train_shakespeare.yaml", *overrides(**keys)]


def test_the_schedule_is_logged_every_step_and_resumes_bit_exactly_across_its_change_points(tiny_data, tmp_path):
    run_in_process(schedule_args(tiny_data, tmp_path, run_name="whole"))
    # stopped at step 3, before the warm-up ends (4) and the decay ends (7), then resumed to the end
    run_in_process(schedule_args(tiny_data, tmp_path, run_name="split", max_iters=3))
    run_in_process(schedule_args(tiny_data, tmp_path, run_name="split", max_iters=8, init_from="resume"))
    cfg = read_checkpoint(tmp_path / "whole" / "ckpt-0000008.pt")["config"]
    whole = {r["iter"]: r for r in read_log(tmp_path / "whole") if r["event"] == "train"}
    split = {r["iter"]: r for r in read_log(tmp_path / "split") if r["event"] == "train"}
    assert sorted(whole) == sorted(split) == list(range(8))
    sched = Schedule("cosine", 4, 7, 0.25)
    for it, rec in whole.items():
        factor = alpha_factor_at(it, sched)
        assert rec["alpha_factor"] == factor and rec["alpha_sites"] == [2.0 * factor, 0.5 * factor] * 2
        weighted = sum(w * sl for w, sl in zip([2.0, 0.5, 2.0, 0.5], rec["sites"]))
        assert rec["spatial"] == pytest.approx(factor * weighted, rel=1e-5, abs=1e-7), it
        assert [rec[k] for k in ("loss", "task", "spatial")] == [split[it][k] for k in ("loss", "task", "spatial")]
    assert whole[0]["spatial"] == 0.0 and whole[2]["alpha_factor"] == 0.5
    a, b = (read_checkpoint(tmp_path / run / "ckpt-0000008.pt") for run in ("whole", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    middle = read_checkpoint(tmp_path / "split" / "ckpt-0000003.pt")["alpha"]
    assert middle["sites"] == [2.0, 0.5, 2.0, 0.5] and middle["last_factor"] == 0.5  # step 2's
    assert middle["alpha_schedule"] == cfg["alpha_schedule"] == "cosine"
    assert a["alpha"]["last_factor"] == 0.25 and a["alpha"]["last_sites"] == [0.5, 0.125, 0.5, 0.125]
    assert (tmp_path / "whole").is_dir() and train.TrainConfig(alpha_mlp=0.5).alpha_label() == "a2.5-0.5"


# ----------------------------------------------------------------------------- a GPT-2 of width 48 made topographic

@pytest.fixture(scope="module")
def gpt2_48(tmp_path_factory):
    """A randomly initialised transformers GPT2LMHeadModel of width 48 (no square sheet) with GPT-2's gelu_new,
    random biases and larger MLP inputs, saved with save_pretrained."""
    return random_hf_gpt2(tmp_path_factory.mktemp("hf48") / "gpt2-48", 48)


def test_a_gpt2_of_width_48_becomes_topographic_on_a_4_by_12_sheet_and_is_analysed(gpt2_48, gpt2_run, tmp_path,
                                                                                     monkeypatch):
    import json

    from topolm.checkpoint import load_model
    folder, hf = gpt2_48
    run_in_process([PYTHON, "init_pos.py", "layout=random", "n_layer=2", "n_embed=48", "sheet_rows=4", "seed=5",
                    f"out={tmp_path / 'pos'}"])
    meta = json.loads((tmp_path / "pos" / "meta.json").read_text())
    assert (meta["rows"], meta["cols"]) == (4, 12) and "side" not in meta
    keys = dict(dataset=str(gpt2_run.data), out_dir=str(tmp_path), init_from=str(folder), sheet_rows=4,
                position_dir=str(tmp_path / "pos"), max_iters=4, eval_interval=4, save_interval=4, eval_iters=2,
                alpha=5.0, learning_rate=1e-3, min_lr=1e-4, warmup_iters=0)
    args = [a for a in overrides(**keys) if a.split("=", 1)[0] not in ("n_layer", "n_head", "n_embed", "vocab_size",
                                                                          "block_size")]
    with monkeypatch.context() as m:  # the model as the run starts it, saved before any step
        m.setattr(train, "train_loop", lambda run, stop: train.save(run, 0))
        run_in_process([PYTHON, "train.py", *args, "run_name=zero"])
    start, ckpt, _ = load_model(tmp_path / "zero" / "ckpt-0000000.pt")
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (start(ids, ids)[0] - hf(ids).logits).abs().max().item() < 1e-5
    assert start.config.sheet == (4, 12) and ckpt["layout"]["permutation"]
    assert np.array_equal(start.sheet.unit_coords.numpy(), np.load(tmp_path / "pos" / "positions.npy"))

    run_in_process([PYTHON, "train.py", *args, "run_name=run"])
    evals = [r for r in read_log(tmp_path / "run") if r["event"] == "eval"]
    assert evals[-1]["train"]["spatial"] < evals[0]["train"]["spatial"], evals
    assert read_checkpoint(tmp_path / "run" / "ckpt-0000004.pt")["model_config"]["sheet_rows"] == 4

    out = tmp_path / "figures"
    run_in_process([PYTHON, "analyze.py", f"ckpt={tmp_path / 'run'}", f"out={out}", "permutations=9",
                    "null_shuffles=2", "heldout_tokens=256"])
    units = np.load(out / "units.npz")
    summary = json.loads((out / "summary.json").read_text())["model"]
    assert summary["sheet"] == [4, 12] and summary["alpha_sites"] == [5.0] * 4
    for s, name in enumerate(units["site_names"]):
        coords, t = units["coords"][s], units["t_verb_noun"][s]
        grid = np.full((4, 12), np.nan)
        grid[coords[:, 0], coords[:, 1]] = t
        assert not np.isnan(grid).any()  # one unit on every cell of the 4 x 12 grid
        assert summary["sites"][name]["verb_noun"]["morans_i"] == pytest.approx(_esda_i(grid, 4, 12).I, abs=1e-12)


def test_an_export_of_a_rectangular_sheet_with_per_site_weights_reads_back_as_it_was(tmp_path):
    import json

    from topolm.checkpoint import load_model, make_payload
    from topolm.hf import export_hf

    cfg = GPTConfig(n_layer=2, n_head=2, n_embed=48, sheet_rows=8, block_size=16, vocab_size=64, radius=2,
                    neighborhoods_per_batch=3, alpha_sites=[1.0, 0.0, 2.5, 0.5])
    torch.manual_seed(0)
    gpt = GPT(cfg, random_layout(4, 48, seed=3, shape=(8, 6)))
    ckpt = make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="random")
    assert ckpt["layout"]["permutation"]
    export_hf(gpt, ckpt, tmp_path / "hf", "test")
    sheet = json.loads((tmp_path / "hf" / "topolm.json").read_text())
    assert (sheet["grid_rows"], sheet["grid_cols"]) == (8, 6) and "grid_side" not in sheet
    assert sheet["spatial_loss"]["alpha_sites"] == [1.0, 0.0, 2.5, 0.5]
    back, back_ckpt, _ = load_model(tmp_path / "hf")
    assert back.config.sheet == (8, 6) and back.config.site_alpha == [1.0, 0.0, 2.5, 0.5]
    assert back.spatial_sites == [0, 2, 3] and back_ckpt["layout"]["permutation"]
    assert torch.equal(back.sheet.unit_coords, gpt.sheet.unit_coords)


def test_finetuning_scales_every_sites_weight(tmp_path):
    import finetune
    from topolm.checkpoint import make_payload
    from topolm.config import load_config

    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=64, radius=2,
                        neighborhoods_per_batch=3, alpha=2.0, alpha_mlp=0.0))
    ckpt = make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="random")
    cfg = load_config(finetune.FinetuneConfig, ["finetune_glue.yaml", "ckpt=x", "alpha_scale=0.25"])
    model = finetune.build_model(ckpt, cfg, n_outputs=2, resume=False)
    assert model.gpt.config.site_alpha == [0.5, 0.0, 0.5, 0.0] and model.gpt.spatial_sites == [0, 2]


def test_a_position_set_of_another_sheet_or_a_resume_on_another_sheet_is_refused(tiny_data, tmp_path):
    from conftest import one_error_line, run_main

    run_in_process([PYTHON, "init_pos.py", "layout=random", "n_layer=2", "n_embed=48", "sheet_rows=4",
                    f"out={tmp_path / 'pos'}"])
    args = overrides(dataset=str(tiny_data), out_dir=str(tmp_path / "out"), run_name="r", n_embed=48, max_iters=1,
                     position_dir=str(tmp_path / "pos"))
    one_error_line(run_main(train, ["train_shakespeare.yaml", *args]), "is for a 4x12 sheet; this model's is 6x8",
                   "set sheet_rows=4")
    assert not (tmp_path / "out").exists()
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml", *args, "sheet_rows=4"])
    resume = ["train_shakespeare.yaml", *args, "init_from=resume", "max_iters=2", "position_dir=''"]
    one_error_line(run_main(train, resume), "a 4x12 sheet in checkpoint vs 6x8 now (sheet_rows)")
