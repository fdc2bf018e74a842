"""train.py's topography at every evaluation (topolm/topography.py), keep_every, and development.py."""
import json
import math
import os

import pytest

from conftest import GPT2_TINY, PYTHON, REPO, grammar_corpus, overrides, read_log, run_in_process


def train_args(data, out, **kw):
    return [PYTHON, "train.py", "train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(out), **kw)]


def topography_records(run_dir) -> dict:
    return {r["iter"]: r for r in read_log(run_dir) if r["event"] == "topography"}


def close(a, b) -> bool:
    return (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def topo_run(tmp_path_factory):
    """A 30-step tiny GPT-2 run logging to wandb offline: topography at every 10 steps, maps every 20, and
    checkpoints every 10 of which keep_last=1 and keep_every=2 keep the newest and those of step 20, 40, ..."""
    from conftest import process_state_restored

    root = tmp_path_factory.mktemp("topo")
    data = grammar_corpus(root / "data")
    kw = {**GPT2_TINY, "max_iters": 30, "eval_interval": 10, "save_interval": 10, "lr_decay_iters": 30,
          "topography_image_interval": 20, "keep_last": 1, "keep_every": 2, "wandb_log": "true"}
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        with process_state_restored():
            ran = run_in_process(train_args(data, root, run_name="run", **kw))
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = old
    return root / "run", ran


def test_topography_is_logged_at_every_evaluation_with_maps_at_their_interval(topo_run):
    run_dir, ran = topo_run
    records = topography_records(run_dir)
    assert sorted(records) == [0, 10, 20, 30]
    evals = sorted(r["iter"] for r in read_log(run_dir) if r["event"] == "eval")
    assert evals == [0, 10, 20, 30]
    first, last = records[0], records[30]
    assert list(last["contrasts"]) == ["localizer"] and list(last["sites"]) == ["layer.0.attn", "layer.0.mlp",
                                                                                   "layer.1.attn", "layer.1.mlp"]
    # the spatial loss falls and neighbours grow more alike as the run trains with alpha > 0
    assert last["mean"]["spatial_loss"] < first["mean"]["spatial_loss"] - 0.1
    assert last["mean"]["adjacent_corr"] > last["mean"]["far_corr"]
    for r in records.values():  # the mean is the mean of the sites
        assert close(r["mean"]["spatial_loss"], sum(e["spatial_loss"] for e in r["sites"].values()) / 4)
    assert sorted(p.name for p in (run_dir / "topography").glob("*.png")) == [
        "maps-0000000.png", "maps-0000020.png", "maps-0000030.png"]
    assert records[20]["image"]["path"] == "topography/maps-0000020.png" and "image" not in records[10]
    assert (run_dir / "wandb").is_dir()  # the offline wandb run
    assert "step 30: topography: spatial loss" in ran.stdout


def test_analyze_on_the_checkpoint_of_a_step_gives_the_logged_values(topo_run, tmp_path):
    from topolm.checkpoint import load_checkpoint
    from topolm.topography import TopographyKeys, analyze_keys

    run_dir, _ = topo_run
    ckpt = run_dir / "ckpt-0000030.pt"
    keys = {k: v for k, v in load_checkpoint(ckpt)["config"].items() if k.startswith("topography")}
    run_in_process([PYTHON, "analyze.py", f"ckpt={ckpt}", f"out={tmp_path / 'a'}", "permutations=0",
                    *analyze_keys(TopographyKeys(**keys))])
    whole = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary = whole["model"]
    logged = topography_records(run_dir)[30]
    for name, entry in list(logged["sites"].items()) + [("mean", logged["mean"])]:
        theirs = summary["mean"] if name == "mean" else summary["sites"][name]
        for key in ("spatial_loss", "adjacent_corr", "far_corr"):
            assert close(entry[key], theirs[key]), (name, key, entry[key], theirs[key])
        for key in ("morans_i", "null_i"):
            assert close(entry["localizer"][key], theirs["localizer"][key]), (name, key)
    assert logged["heldout_samples"] == summary["heldout"]["tokens"]
    assert whole["stimuli"]["localizer_items_per_condition"] == 24


def test_keep_every_keeps_every_nth_checkpoint_beyond_keep_last(topo_run):
    run_dir, _ = topo_run
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000020.pt", "ckpt-0000030.pt"]


def test_development_json_holds_the_logged_values_and_maps_of_the_checkpoints(topo_run, tmp_path):
    run_dir, _ = topo_run
    run_in_process([PYTHON, "development.py", f"run={run_dir}", f"out={tmp_path / 'dev'}"])
    dev = json.loads((tmp_path / "dev" / "development.json").read_text())
    log = read_log(run_dir)
    evals = {r["iter"]: r for r in log if r["event"] == "eval"}
    assert dev["steps"] == sorted(evals)
    assert dev["task_loss"]["val"] == [evals[s]["val"]["task"] for s in dev["steps"]]
    records = topography_records(run_dir)
    topo = dev["topography"]
    assert topo["steps"] == sorted(records)
    for k, step in enumerate(topo["steps"]):
        for where, entry in [("mean", records[step]["mean"])] + list(records[step]["sites"].items()):
            got = topo["mean"] if where == "mean" else topo["sites"][where]
            for key in ("spatial_loss", "adjacent_corr", "far_corr"):
                assert got[key][k] == entry[key]
            assert got["localizer"]["morans_i"][k] == entry["localizer"]["morans_i"]
            assert got["localizer"]["null_i"][k] == entry["localizer"]["null_i"]
    # the maps are measured again on the kept checkpoints: Moran's I as logged at those steps
    assert dev["maps"]["steps"] == [20, 30]
    for step in (20, 30):
        logged = [e["localizer"]["morans_i"] for e in records[step]["sites"].values()]
        assert all(close(a, b) for a, b in zip(dev["maps"]["morans_i"][str(step)], logged))
    assert {p.name for p in (tmp_path / "dev").iterdir()} == {"development.json", "development.png", "maps.png"}


def test_development_refuses_a_step_without_its_checkpoint(topo_run, tmp_path):
    from conftest import one_error_line

    run_dir, _ = topo_run
    ran = run_in_process([PYTHON, "development.py", f"run={run_dir}", "steps=10", f"out={tmp_path / 'd'}"], check=False)
    one_error_line(ran, "steps=10", "no checkpoint of step 10", "keep_every")
    assert not (tmp_path / "d").exists()


def test_keep_every_keeps_across_a_resume_and_a_vocabulary_without_endoftext_is_not_measured(tiny_data, tmp_path):
    # TINY's 64 ids have no <|endoftext|>, which every held-out window and stimulus of the analysis starts with
    run_dir = tmp_path / "k"
    common = dict(save_interval=2, keep_last=2, keep_every=2)
    ran = run_in_process(train_args(tiny_data, tmp_path, run_name="k", max_iters=10, **common))
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000004.pt", "ckpt-0000008.pt",
                                                                  "ckpt-0000010.pt"]
    assert ran.stdout.count("topography: not measured: the model's vocab_size=64 has no <|endoftext|>") == 1
    run_in_process(train_args(tiny_data, tmp_path, run_name="k", max_iters=14, init_from="resume", **common))
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000004.pt", "ckpt-0000008.pt",
                                                                  "ckpt-0000012.pt", "ckpt-0000014.pt"]
    assert [r["iter"] for r in read_log(run_dir) if r["event"] == "resume"] == [10]
    assert topography_records(run_dir) == {}


def test_topography_false_logs_none_and_keep_every_needs_keep_last(tiny_data, tmp_path):
    from conftest import one_error_line

    data = grammar_corpus(tmp_path / "grammar")
    gpt2 = {**GPT2_TINY, "max_iters": 1, "eval_interval": 1}
    run_in_process(train_args(data, tmp_path, run_name="on", **gpt2))
    run_in_process(train_args(data, tmp_path, run_name="off", topography="false", **gpt2))
    assert sorted(topography_records(tmp_path / "on")) == [0, 1] and topography_records(tmp_path / "off") == {}
    ran = run_in_process(train_args(tiny_data, tmp_path, run_name="e", max_iters=2, keep_every=2), check=False)
    one_error_line(ran, "keep_every=2 needs keep_last > 0")


def test_the_small_localizer_is_the_first_items_of_the_shipped_one(tmp_path):
    import shutil

    from topolm import stimuli

    shutil.copy(REPO / "stimuli" / "localizer.tsv", tmp_path / "localizer.tsv")
    written = stimuli.write_small_localizer(tmp_path)
    assert written.read_bytes() == (REPO / "stimuli" / "small" / "localizer.tsv").read_bytes()
    from topolm.stimsets import read_sets
    [loc] = read_sets(str(written), REPO, REPO / "stimuli")
    assert loc.name == "localizer" and set(loc.contrasts) == {"localizer"}
    assert [it.text for it in loc.items if it.labels["condition"] == "S"] == stimuli.read_localizer()["S"][:24]


@pytest.mark.torchrun
def test_under_ddp_every_rank_measures_and_the_ranks_stay_in_step(tmp_path):
    from conftest import run_script, torchrun

    data = grammar_corpus(tmp_path / "data")
    args = ["train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="d", backend="gloo",
                                                 gradient_accumulation_steps=2, topography_image_interval=4,
                                                 **{**GPT2_TINY, "max_iters": 4, "eval_interval": 2,
                                                    "save_interval": 4, "lr_decay_iters": 4})]
    run_script(torchrun(2, "train.py", args))
    log = read_log(tmp_path / "d")
    assert sorted(topography_records(tmp_path / "d")) == [0, 2, 4]  # rank 0 alone writes: one record per step
    end = [r for r in log if r["event"] == "end"][0]
    assert len(set(end["param_sha256"])) == 1 and len(end["param_sha256"]) == 2
    assert sorted(p.name for p in (tmp_path / "d" / "topography").iterdir()) == ["maps-0000000.png", "maps-0000004.png"]
