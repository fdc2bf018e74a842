"""analyze.py end to end on a tiny trained checkpoint: every file, and summary.json consistent with units.npz."""
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import ablate
import analyze
from topolm import analysis
from conftest import PYTHON, REPO, one_error_line, run_in_process, run_main


def test_analyze_writes_every_site_and_a_consistent_summary(gpt2_run, tmp_path):
    out = tmp_path / "figures"
    run, step = gpt2_run.run, gpt2_run.iters
    proc = run_in_process([PYTHON, "analyze.py", f"ckpt={run}", f"compare={run}", f"out={out}", "permutations=99",
                       "null_shuffles=20", "heldout_tokens=512"])
    assert "layer.1.mlp" in proc.stdout and str(out / "localizer_maps.png") in proc.stdout

    units = np.load(out / "units.npz")
    n_sites, n_embed = 4, 36
    assert units["site_names"].tolist() == ["layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp"]
    assert units["coords"].shape == (n_sites, n_embed, 2) and units["coords"].dtype.kind == "i"
    for key in ("t_localizer", "p_localizer", "t_verb_noun", "p_verb_noun"):
        assert units[key].shape == (n_sites, n_embed) and units[key].dtype == np.float64
    assert units["selective_localizer"].dtype == bool
    q, sig = analysis.fdr(units["p_localizer"], 0.05)
    np.testing.assert_array_equal(units["selective_localizer"], sig & (units["t_localizer"] > 0))
    assert (np.load(out / "compare_units.npz")["t_localizer"] == units["t_localizer"]).all()

    for contrast in ("localizer", "verb_noun"):
        assert (out / f"{contrast}_maps.png").stat().st_size > 10_000
        for label in ("model", "compare"):
            for name in units["site_names"]:
                assert (out / "sites" / label / contrast / f"{name}.png").is_file()
    for name in ("morans_i.png", "correlation_vs_distance.png", "response_profile.png"):
        assert (out / name).is_file()
    assert not list(out.rglob("*.tmp*"))

    summary = json.loads((out / "summary.json").read_text())
    model = summary["model"]
    assert model["step"] == step and model["heldout"]["source"].endswith("val.bin") and model["heldout"]["tokens"] >= 500
    data = gpt2_run.data
    assert model["heldout"]["source"] == str(data.resolve() / "val.bin")
    assert model["heldout"]["from"] == f"the checkpoint's data ({data})"
    assert f"model {gpt2_run.ckpt}: held-out text {data.resolve() / 'val.bin'} (from" in proc.stdout
    for s, name in enumerate(units["site_names"]):
        site = model["sites"][name]
        for contrast in ("localizer", "verb_noun"):
            m = analysis.morans_i(units[f"t_{contrast}"][s], units["coords"][s], permutations=99, seed=0)
            assert site[contrast]["morans_i"] == pytest.approx(m.i, abs=1e-12)
            assert site[contrast]["p"] == pytest.approx(m.p, abs=1e-12)
            lo, hi = site[contrast]["null_i_95"]
            assert lo <= site[contrast]["null_i"] <= hi
        assert site["fraction_selective"] == pytest.approx(units["selective_localizer"][s].mean())
        assert site["adjacent_corr"] == pytest.approx(units["adjacent_corr"][s])
        assert site["spatial_loss"] == pytest.approx(units["spatial_loss"][s])
        assert 0.0 <= site["spatial_loss"] <= 1.0
    assert model["mean"]["localizer"]["morans_i"] == pytest.approx(units["moran_localizer"].mean())
    assert summary["compare"]["sites"] == model["sites"]
    # provenance: the checkpoint, its step, its weights' digest and the code version, in both files
    from topolm.checkpoint import load_checkpoint
    from topolm.provenance import code_version, weights_digest
    ckpt_file = gpt2_run.ckpt
    expected = {"checkpoint": str(ckpt_file), "kind": "pretrain", "step": step,
                "weights_sha256": weights_digest(load_checkpoint(ckpt_file)["model"]), "code_version": code_version()}
    assert model["provenance"] == expected and json.loads(str(units["provenance"])) == expected

    again = run_in_process([PYTHON, "analyze.py", f"ckpt={run}", f"out={out}"], check=False)
    assert again.returncode == 2 and "overwrite" in again.stderr and again.stderr.count("\n") == 1


def _save_untrained(folder, **config):
    from topolm.checkpoint import make_payload, save_checkpoint, tokenizer_for
    from model import GPT, GPTConfig
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embed=16, radius=2, neighborhoods_per_batch=2, **config))
    payload = make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=tokenizer_for(gpt.config.vocab_size),
                           layout_source="test")
    save_checkpoint(payload, folder / "ckpt-0000000.pt")
    return folder


def test_analyze_refuses_models_it_cannot_read_stimuli_with(tmp_path):
    run = _save_untrained(tmp_path / "v64", vocab_size=64, block_size=64)
    one_error_line(run_in_process([PYTHON, "analyze.py", f"ckpt={run}", f"out={tmp_path / 'fig'}"], check=False),
                   "vocab_size=64")
    assert not (tmp_path / "fig").exists()


FAST = ["permutations=9", "null_shuffles=2", "heldout_tokens=256"]


def test_a_short_block_analyses_the_matched_items_that_fit(tmp_path):
    """block_size=32 reads 6 of the 96 nonword lists whole: the items that do not fit leave every condition, and
    the statistics are those of the matched items that are left."""
    from topolm import stimuli
    from topolm.checkpoint import load_model
    from topolm.tokenizer import gpt2_encoding
    run = _save_untrained(tmp_path / "short", block_size=32)
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={run}", f"out={out}", *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    enc, loc = gpt2_encoding(), stimuli.read_localizer()
    fits = {c: np.array([len(enc.encode_ordinary(x)) + 1 <= 32 for x in loc[c]]) for c in "SWJN"}
    keep = np.flatnonzero(fits["S"] & fits["W"] & fits["J"] & fits["N"])
    assert 2 <= len(keep) < 96 and fits["S"].all() and not fits["N"].all()
    st = json.loads((out / "summary.json").read_text())["stimuli"]
    gone = 96 - len(keep)
    assert st["localizer_items_per_condition"] == len(keep) and st["localizer_items_in_file"] == 96
    assert st["left_out"]["per_condition"] == {"S": gone, "W": gone, "J": gone, "N": gone, "noun": 0, "verb": 0}
    assert st["left_out"]["too_long"] == {**{c: int((~fits[c]).sum()) for c in "SWJN"}, "noun": 0, "verb": 0}
    assert st["left_out"]["block_size"] == 32 and (st["nouns"], st["verbs"]) == (113, 114)
    assert f"left out: S {gone}, W {gone}, J {gone}, N {gone}, noun 0, verb 0" in proc.stdout
    assert f"analysed: {len(keep)} of 96 localizer items per condition" in proc.stdout
    units = np.load(out / "units.npz")
    assert units["localizer_items"].tolist() == keep.tolist() and units["n_items_localizer"].tolist() == [len(keep)] * 2
    # the contrast of the matched items, measured here item by item
    model, _, _ = load_model(run)
    resp = {}
    for c in "SN":
        ids = [enc.encode_ordinary(loc[c][k]) for k in keep]
        resp[c] = analysis.site_responses(model, ids, [(0, len(x)) for x in ids], batch_size=1)
    t, p = analysis.welch_t(resp["S"].swapaxes(0, 1), resp["N"].swapaxes(0, 1))
    np.testing.assert_array_equal(units["t_localizer"], t)
    np.testing.assert_array_equal(units["p_localizer"], p)
    model_summary = json.loads((out / "summary.json").read_text())["model"]
    assert isinstance(model_summary["sites"]["layer.0.mlp"]["localizer"]["morans_i"], float)


def test_a_side_left_with_fewer_than_2_items_is_undefined(tmp_path):
    """block_size=16 fits no jabberwocky item: every localizer item leaves, S - N is undefined with the reason,
    and verbs - nouns (every frame fits) is measured."""
    run = _save_untrained(tmp_path / "shorter", block_size=16)
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={run}", f"out={out}", *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stimuli"]["localizer_items_per_condition"] == 0
    assert summary["stimuli"]["left_out"]["per_condition"]["N"] == 96
    for site in summary["model"]["sites"].values():
        assert site["localizer"]["morans_i"] is None and site["localizer"]["p"] is None
        assert site["localizer"]["undefined"].startswith("fewer than 2 items on a side (0 vs 0; 96 vs 96 left out")
        assert isinstance(site["verb_noun"]["morans_i"], float)
    assert summary["model"]["mean"]["localizer"]["sites_undefined"] == 2
    assert "Moran's I undefined: fewer than 2 items on a side" in proc.stdout
    assert np.isnan(np.load(out / "units.npz")["t_localizer"]).all()


def _with_weight(gpt2_run, folder, name, index, value):
    """A copy of the session's checkpoint with one weight set to `value`, saved by the project's writer."""
    from topolm.checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(gpt2_run.ckpt)
    ckpt["model"][name][index] = value
    path = folder / gpt2_run.ckpt.name
    save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_a_response_that_is_not_a_number_is_an_error(gpt2_run, tmp_path, value, kind):
    path = _with_weight(gpt2_run, tmp_path / "bad", "transformer.h.1.mlp.c_proj.weight", (3, 0), value)
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={path}", f"out={out}", *FAST])
    bar = [x for x in proc.stderr.splitlines() if x.startswith("stimuli (")]  # the progress bar, cut short
    proc = proc._replace(stderr="".join(x + "\n" for x in proc.stderr.splitlines() if x and x not in bar))
    line = one_error_line(proc, "the response of site layer.1.mlp to ", f"is {kind}", "NaN or inf in its weights",
                          "nothing was written")
    assert re.search(r"to (localizer item \d+ of condition [SWJN]|the (noun|verb) '\w+' in its frame \d) is", line)
    assert not out.exists()
    # the held-out activations are refused the same way
    from topolm.checkpoint import load_model
    from topolm.config import UserError
    model, _, _ = load_model(path)
    with pytest.raises(UserError, match=rf"site layer.1.mlp to held-out window 0 is {kind}"):
        analysis.heldout_correlations(model, np.ones((2, 8), dtype=np.int64))


# ----------------------------------------------------------------------------- the ablation's units file

def _write_units(path, ckpt_file, t, provenance=True):
    from topolm.checkpoint import load_model
    from topolm.provenance import provenance as record
    model, ckpt, ckpt_path = load_model(ckpt_file)
    extra = {"provenance": np.array(json.dumps(record(ckpt_path, ckpt, model)))} if provenance else {}
    np.savez(path, site_names=np.array(model.site_names), coords=model.sheet.unit_coords.numpy(), t_localizer=t, **extra)
    return path


def test_ablate_never_chooses_a_unit_whose_t_is_undefined(gpt2_run, tmp_path):
    t = np.random.default_rng(0).normal(size=(4, 36))
    t[1, 4:] = np.nan  # layer.0.mlp: 4 units with a defined t
    units = _write_units(tmp_path / "units.npz", gpt2_run.ckpt, t)
    out = tmp_path / "ablation.json"
    args = [f"ckpt={gpt2_run.ckpt}", f"units={units}", f"data_dir={gpt2_run.pairs}", f"out={out}"]
    one_error_line(run_main(ablate, [*args, "k=5"]), "k=5", f"units={units}", "only 4 of 36 units of layer.0.mlp",
                   "k <= 4")
    assert not out.exists()
    proc = run_main(ablate, [*args, "k=4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen = json.loads(out.read_text())["sweep"][0]["selective"]["units"]
    assert chosen["layer.0.mlp"] == np.argsort(-t[1, :4]).tolist()
    assert all(np.isfinite(t[s, chosen[name]]).all() for s, name in enumerate(chosen))


def test_ablate_refuses_the_units_file_of_another_model(gpt2_run, tmp_path):
    """A control shares its layout with the model: only the weights tell its units file apart."""
    control = _with_weight(gpt2_run, tmp_path / "control", "transformer.h.0.mlp.c_fc.weight", (0, 0), 0.5)
    fig = tmp_path / "fig"
    assert run_main(analyze, [f"ckpt={gpt2_run.ckpt}", f"compare={control}", f"out={fig}", *FAST]).returncode == 0
    out = tmp_path / "ablation.json"
    common = ["k=2", f"data_dir={gpt2_run.pairs}", f"out={out}"]
    proc = run_main(ablate, [f"ckpt={gpt2_run.ckpt}", f"units={fig / 'compare_units.npz'}", *common])
    one_error_line(proc, f"{fig / 'compare_units.npz'} was measured on {control} (step {gpt2_run.iters}",
                   f"not on the model loaded, {gpt2_run.ckpt} (step {gpt2_run.iters}",
                   f"run python analyze.py ckpt={gpt2_run.ckpt}")
    one_error_line(run_main(ablate, [f"ckpt={control}", f"units={fig / 'units.npz'}", *common]),
                   f"measured on {gpt2_run.ckpt}", f"not on the model loaded, {control}")
    bare = _write_units(tmp_path / "bare.npz", gpt2_run.ckpt, np.load(fig / "units.npz")["t_localizer"], False)
    one_error_line(run_main(ablate, [f"ckpt={gpt2_run.ckpt}", f"units={bare}", *common]),
                   f"{bare} records no provenance", f"run python analyze.py ckpt={gpt2_run.ckpt}")
    assert not out.exists()
    for ckpt, units in ((gpt2_run.ckpt, "units.npz"), (control, "compare_units.npz")):
        proc = run_main(ablate, [f"ckpt={ckpt}", f"units={fig / units}", *common])
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(out.read_text())
        assert r["units_provenance"] == r["provenance"] and r["checkpoint"] == str(ckpt)


def test_heldout_text_is_the_val_bin_of_the_checkpoint_data(tmp_path):
    """The analysis reads the checkpoint's `data` field (a finetuned checkpoint carries its backbone's), not the
    writer's config, and says which text it used."""
    from analyze import AnalyzeConfig, heldout_tokens
    folders = {}
    for name, first in (("recorded", 7), ("by_name", 8), ("config", 9)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        np.full(100, first, dtype=np.uint16).tofile(folders[name] / "val.bin")
    localizer = {"S": ["The dog ran home."]}
    cfg = AnalyzeConfig(ckpt="x")  # ckpt is required; heldout_tokens does not read it

    def held(data):
        tokens, source, chosen_by = heldout_tokens(cfg, {"data": data, "config": {"dataset": str(folders["config"])}},
                                                   localizer)
        return int(tokens[0]), source, chosen_by

    recorded = {"dataset": "shakespeare", "path": str(folders["recorded"]), "tokenizer": "gpt2"}
    assert held(recorded) == (7, str(folders["recorded"] / "val.bin"), "the checkpoint's data (shakespeare)")
    # the recorded folder is gone (e.g. another machine): the dataset key is resolved here
    moved = {"dataset": str(folders["by_name"]), "path": str(tmp_path / "gone"), "tokenizer": "gpt2"}
    assert held(moved)[:2] == (8, str(folders["by_name"] / "val.bin"))
    # no data recorded: the localizer's sentences, whatever the writer's config named
    tokens, source, chosen_by = heldout_tokens(cfg, {"data": None, "config": {"dataset": str(folders["config"])}},
                                               localizer)
    assert source == "the localizer's sentences (no val.bin found)" and chosen_by == "the fallback"
    assert len(tokens) > 0 and int(tokens[0]) != 9
    given = AnalyzeConfig(ckpt="x", heldout=str(folders["config"] / "val.bin"))
    assert heldout_tokens(given, {"data": recorded}, localizer)[1:] == (str(folders["config"] / "val.bin"), "heldout=")


def _no_signal_stimuli(folder):
    """The shipped stimuli with every nonword list replaced by its item's sentence: S - N has no signal."""
    import csv
    folder.mkdir()
    rows = list(csv.DictReader(open(REPO / "stimuli" / "localizer.tsv", newline="", encoding="utf-8"), delimiter="\t",
                               quoting=csv.QUOTE_NONE))
    sentence = {r["item"]: r["text"] for r in rows if r["labels"] == "condition=S"}
    lines = ["item\tlabels\ttext"] + [f"{r['item']}\t{r['labels']}\t"
                                      f"{sentence[r['item']] if r['labels'] == 'condition=N' else r['text']}" for r in rows]
    (folder / "localizer.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(REPO / "stimuli" / "pos.tsv", folder / "pos.tsv")
    return folder


def test_a_contrast_without_signal_is_undefined_at_every_batch_size(tmp_path, capsys):
    import torch
    from topolm import figures
    from topolm.checkpoint import make_payload, save_checkpoint, tokenizer_for
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embed=16, radius=2, neighborhoods_per_batch=2)).eval()
    with torch.no_grad():
        gpt.transformer.h[0].attn.c_proj.weight.zero_()  # layer.0.attn is 0 for every item: zero variance in both groups
    save_checkpoint(make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=tokenizer_for(50304),
                                 layout_source="test"), tmp_path / "run" / "ckpt-0000000.pt")
    stim = _no_signal_stimuli(tmp_path / "stim")
    units, summaries = {}, {}
    for batch_size in (1, 7, None):
        out = tmp_path / f"fig-{batch_size}"
        analyze.main([f"ckpt={tmp_path / 'run'}", f"stimuli={stim}", f"out={out}", "permutations=99", "null_shuffles=20",
                      "heldout_tokens=256"] + ([f"batch_size={batch_size}"] if batch_size else []))
        units[batch_size] = dict(np.load(out / "units.npz"))
        summaries[batch_size] = json.loads((out / "summary.json").read_text())["model"]
    for batch_size in (7, None):  # the responses, hence every statistic, bit for bit
        for key in ("mean_localizer", "t_localizer", "t_verb_noun", "p_verb_noun"):
            np.testing.assert_array_equal(units[batch_size][key], units[1][key], err_msg=f"{key} at {batch_size}")
    t = units[1]["t_localizer"]
    assert np.isnan(t[0]).all() and (t[1] == 0).all() and np.isnan(units[1]["t_verb_noun"][0]).all()
    assert not units[1]["selective_localizer"].any()
    for model in summaries.values():
        attn, mlp = model["sites"]["layer.0.attn"], model["sites"]["layer.0.mlp"]
        for site in (attn["localizer"], mlp["localizer"], attn["verb_noun"]):
            assert site["morans_i"] is None and site["p"] is None and site["null_i"] is None
        assert "zero variance in both groups" in attn["localizer"]["undefined"]
        assert "t = 0 at every unit" in mlp["localizer"]["undefined"]
        assert isinstance(mlp["verb_noun"]["p"], float) and "undefined" not in mlp["verb_noun"]
        loc, vn = model["mean"]["localizer"], model["mean"]["verb_noun"]
        assert loc["sites_p_below_0.05"] == 0 and loc["sites_undefined"] == 2 and loc["morans_i"] is None
        assert vn["sites_undefined"] == 1 and vn["morans_i"] == mlp["verb_noun"]["morans_i"]
    assert "undefined" in capsys.readouterr().out
    # the figures say so: no colour bar where no unit has a defined t other than 0
    loaded = SimpleNamespace(title="run (step 0)", name="run", label="model", model=gpt)
    m = units[1]
    for s, words in ((0, "undefined"), (1, "t = 0 at every unit")):
        fig = figures.plot_site(loaded, m, s, "localizer", 0.05, figures._vmax([(loaded, m)], "localizer"))
        assert len(fig.axes) == 1 and words in " ".join(t.get_text() for t in fig.texts + fig.axes[0].texts)
    assert len(figures.plot_maps([(loaded, m)], "localizer", 0.05).axes) == 2  # the two maps, no colour bar
    assert len(figures.plot_maps([(loaded, m)], "verb_noun", 0.05).axes) == 3  # layer.0.mlp's t is a finding
