"""reproduce.py and its pieces: the validation losses on the start windows of val.bin (by hand, and the model's
own training loss on the same neighborhoods), the GLUE match by pretrained checkpoint, the table's skipped
inputs, and the table end to end on the session's model and a control."""
import json

import numpy as np
import pytest
import torch

import reproduce
from conftest import numpy_spatial_loss, one_error_line, run_main
from topolm.paper import PAPER, Row, glue_results, markdown, table_rows
from topolm.validation import last_logged_evaluation, start_windows, validation_measures

FAST = ["permutations=9", "null_shuffles=2", "heldout_tokens=256", "fwhm=0", "min_size=3", "seed_threshold=0.5"]


def _control(gpt2_run, folder, alpha: float = 0.0):
    """The session's checkpoint as an alpha = 0 control with one weight changed (its own weights digest)."""
    from topolm.checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(gpt2_run.ckpt)
    ckpt["model_config"]["alpha"] = alpha
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = 0.5
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / gpt2_run.ckpt.name
    save_checkpoint(ckpt, path)
    return path


def _val_tokens(gpt2_run):
    return np.fromfile(gpt2_run.data / "val.bin", dtype=np.uint16)


def test_start_windows_are_the_first_non_overlapping_blocks():
    tokens = np.arange(1000, dtype=np.uint16)
    w = start_windows(tokens, 64, 200)
    assert w.shape == (3, 65) and w[:, 0].tolist() == [0, 64, 128] and (w[2] == np.arange(128, 193)).all()
    assert len(start_windows(tokens, 64, 10**6)) == 15  # (1000 - 1) // 64: every window has its targets


@pytest.mark.parametrize("control", [False, True])
def test_validation_losses_equal_a_hand_computation_on_the_windows(gpt2_run, tmp_path, control):
    from topolm.checkpoint import load_model
    from positions import centres
    model, _, _ = load_model(_control(gpt2_run, tmp_path) if control else gpt2_run.ckpt, "cpu")
    T = model.config.block_size
    tokens = _val_tokens(gpt2_run)
    windows = start_windows(tokens, T, 3 * T + 5)
    got = validation_measures(model, windows, batch_size=1, seed=3)
    assert got["n_windows"] == 3 and got["tokens"] == 3 * T
    # by hand: each window's mean cross-entropy from the model's own loss, window k = tokens[kT : kT + T + 1]; a
    # control's sheet measured as if trained with it: the same weights with alpha 1, the same neighborhoods
    reference = load_model(_control(gpt2_run, tmp_path / "alpha1", 1.0), "cpu")[0] if control else model
    g = torch.Generator().manual_seed(3)
    task, per_site, acts = [], [], {name: [] for name in model.site_names}
    for k in range(3):
        x = torch.from_numpy(tokens[k * T:k * T + T].astype(np.int64))[None]
        y = torch.from_numpy(tokens[k * T + 1:k * T + T + 1].astype(np.int64))[None]
        with torch.no_grad():
            _, losses = reference(x, y, units=reference.sample_units(g))
            for name, a in reference.site_activations(x).items():
                acts[name].append(a[0].double().numpy())
        task.append(float(losses.task))
        per_site.append(losses.per_site.double().numpy())
    assert got["task_loss"] == pytest.approx(np.mean(task), rel=1e-6)
    np.testing.assert_allclose(got["sampled_sl"], np.mean(per_site, axis=0), rtol=1e-5)
    assert got["sampled_sl_sum"] == pytest.approx(np.mean(per_site, axis=0).sum(), rel=1e-5)
    # the full grid: every neighborhood's loss from its formula on all the windows' activations, averaged
    coords = model.sheet.unit_coords.numpy()
    side, r = int(coords.max()) + 1, model.config.radius
    for s, name in enumerate(model.site_names):
        a = np.concatenate(acts[name])
        xy = coords[s]
        losses = [numpy_spatial_loss(a[:, m], xy[m]) for c in centres(side, r)
                  for m in [np.flatnonzero((np.abs(xy[:, 0] - c[0]) < r) & (np.abs(xy[:, 1] - c[1]) < r))]]
        assert got["full_grid_sl"][s] == pytest.approx(np.mean(losses), rel=1e-6)


def _metrics(folder, task, digest, accuracy):
    (folder / task).mkdir(parents=True)
    splits = {"validation": {"accuracy": accuracy}} if task != "cola" else {"validation": {"mcc": accuracy}}
    (folder / task / "metrics.json").write_text(json.dumps({
        "task": task, "splits": splits, "pretrained": {"path": "x", "provenance": {"weights_sha256": digest}}}))


def test_glue_results_are_matched_by_the_pretrained_checkpoint(tmp_path):
    from topolm.glue import task_score
    from topolm.config import UserError
    _metrics(tmp_path / "mine", "sst2", "abc", 0.9)
    _metrics(tmp_path / "mine", "wnli", "abc", 0.1)
    found = glue_results(tmp_path / "mine", "abc")
    assert found["tasks"]["sst2"] == task_score("sst2", {"validation": {"accuracy": 0.9}})
    assert found["average"] == found["tasks"]["sst2"] and found["n_tasks"] == 1  # WNLI left out of the average
    with pytest.raises(UserError, match="finetuned from another checkpoint"):
        glue_results(tmp_path / "mine", "def")


def test_a_glue_folder_of_another_checkpoint_is_refused_before_anything_is_written(gpt2_run, tmp_path):
    _metrics(tmp_path / "glue", "sst2", "0" * 64, 0.9)
    out = tmp_path / "report"
    proc = run_main(reproduce, [f"ckpt={gpt2_run.ckpt}", f"glue={tmp_path / 'glue'}", f"out={out}", *FAST])
    one_error_line(proc, str(tmp_path / "glue" / "sst2" / "metrics.json"), "finetuned from another checkpoint")
    assert not out.exists()


def test_skipped_inputs_are_listed_with_their_reason_never_as_numbers():
    summary = {"mean": {"verb_noun": {"morans_i": 0.25}, "localizer": {"morans_i": 0.5},
                        "clusters": {"n_positive": 3, "n_negative": 1}}}
    topo = {"validation": "no val.bin here", "log": None, "blimp": "no BLiMP pairs given", "glue": "no GLUE runs",
            "summary": summary}
    rows = table_rows(topo, None)
    by_key = {r.key: r for r in rows}
    assert by_key["blimp"].topo is None and by_key["blimp"].skipped == {"topo": "no BLiMP pairs given",
                                                                         "control": "no control= given"}
    assert by_key["moran_verb_noun"].topo == 0.25 and by_key["clusters"].topo == 3
    assert "fwhm=0" in by_key["moran_verb_noun_smoothed"].skipped["topo"]
    assert "concrete_noun_verb not run" in by_key["moran_concrete_noun_verb"].skipped["topo"]
    text = markdown(rows, ("topo", "control"))
    line = next(x for x in text.splitlines() if x.startswith("| BLiMP accuracy"))
    assert line.split("|")[2].strip() == "skipped" and "0.71" in line and "Table 1" in line
    assert "- BLiMP accuracy (topographic model): no BLiMP pairs given" in text
    assert "- validation task loss (nats) (topographic model): no val.bin here" in text
    assert Row("x", "x", None, None, "").as_json()["topolm"] is None


def test_reproduce_writes_the_table_of_a_model_and_its_control(gpt2_run, tmp_path):
    from topolm.blimp import load_blimp_local, score_blimp
    from topolm.checkpoint import load_model
    from topolm.tokenizer import gpt2_encoding
    control = _control(gpt2_run, tmp_path)
    out = tmp_path / "report"
    proc = run_main(reproduce, [f"ckpt={gpt2_run.ckpt}", f"control={control}", f"blimp={gpt2_run.pairs}",
                                f"out={out}", "val_tokens=200", f"glue_root={tmp_path / 'none'}", *FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    rows = {r["key"]: r for r in table["rows"]}
    summary = json.loads((out / "summary.json").read_text())
    tokens = _val_tokens(gpt2_run)
    for which, ckpt, label in (("topolm", gpt2_run.ckpt, "model"), ("control", control, "compare")):
        model, _, _ = load_model(ckpt, "cpu")
        windows = start_windows(tokens, model.config.block_size, 200)
        v = validation_measures(model, windows, 8, 0)
        assert rows["val_task_loss"][which] == v["task_loss"]
        assert rows["sampled_sl_sum"][which] == v["sampled_sl_sum"]
        acc = score_blimp(model, load_blimp_local(gpt2_run.pairs), gpt2_encoding(), 64, "cpu", progress=False)
        assert rows["blimp"][which] == acc["overall"]["accuracy"]
        assert rows["moran_verb_noun"][which] == summary[label]["mean"]["verb_noun"]["morans_i"]
        assert rows["clusters"][which] == summary[label]["mean"]["clusters"]["n_positive"]
    assert rows["sampled_sl_sum"]["beside"]["full grid (every neighborhood)"][0] == pytest.approx(
        table["validation"][0]["full_grid_sl_sum"])
    logged = last_logged_evaluation(gpt2_run.ckpt)
    assert rows["val_task_loss"]["beside"]["log.jsonl's last evaluation"] == [logged["task_loss"], None]
    assert rows["val_task_loss"]["paper"] == {"topolm": 3.075, "control": 2.966, "source": "Table 1",
                                              "note": PAPER["val_task_loss"].note}
    assert set(rows["glue_average"]["skipped"]) == {"topo", "control"} and rows["glue_average"]["topolm"] is None
    assert "no GLUE runs" in rows["glue_average"]["skipped"]["topo"]
    text = (out / "table.md").read_text()
    assert "Skipped:" in text and "GLUE average (WNLI excluded) (control): no GLUE runs" in text
    assert (out / "clusters.png").is_file() and (out / "verb_noun_maps.png").is_file()
    again = run_main(reproduce, [f"ckpt={gpt2_run.ckpt}", f"out={out}", *FAST])
    one_error_line(again, "already holds a table", "overwrite=true")
    assert again.stdout == ""  # refused before any model is read


def test_the_logged_evaluation_is_the_last_eval_event_of_the_run(tmp_path):
    rows = [{"event": "start", "iter": 0},
            {"event": "eval", "iter": 10, "val": {"task": 4.0, "spatial": 9.0, "sites": [0.5, 0.25]}},
            {"event": "train", "iter": 20, "loss": 1.0},
            {"event": "eval", "iter": 30, "val": {"task": 3.5, "spatial": 2.0, "sites": [0.125, 0.375]}},
            {"event": "end", "iter": 30}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = last_logged_evaluation(tmp_path / "ckpt-0000030.pt")
    # the per-site losses before alpha, summed: not the logged `spatial` (alpha times that sum)
    assert (got["step"], got["task_loss"], got["sampled_sl_sum"]) == (30, 3.5, 0.5)
    assert last_logged_evaluation(tmp_path / "elsewhere" / "ckpt.pt") is None


def test_blimp_without_pairs_is_skipped_and_a_missing_folder_refused(tmp_path):
    from topolm.config import UserError
    cfg = reproduce.ReproduceConfig(ckpt="x")
    assert reproduce.read_blimp(cfg).startswith("no BLiMP pairs given")
    with pytest.raises(UserError, match="BLiMP folder not found"):
        reproduce.read_blimp(reproduce.ReproduceConfig(ckpt="x", blimp=str(tmp_path / "none")))


def test_a_control_run_logs_no_spatial_loss_and_none_is_reported(tmp_path):
    rows = [{"event": "eval", "iter": 5, "val": {"task": 4.0, "spatial": 0.0, "sites": [0.0, 0.0]}}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = last_logged_evaluation(tmp_path / "ckpt-0000005.pt", alpha=0.0)
    assert got["task_loss"] == 4.0 and np.isnan(got["sampled_sl_sum"])  # never the logged zeros
