"""sweep.py on planted run folders (log.jsonl, a tiny checkpoint and summary.json written here with known
numbers): configurations, their order, the control, seed means and standard deviations, the plot's data,
the refusals; and the analysis it runs for a run without one, against analyze.py's."""
import json
import math

import pytest

from conftest import PYTHON, one_error_line, run_in_process

# (alpha, seed): (validation task loss, site-mean Moran's I, site-mean spatial loss), planted
PLANTED = {(2.5, 1): (5.10, 0.40, 0.20), (2.5, 2): (5.30, 0.50, 0.26),
           (0, 1): (5.00, 0.02, 0.45), (0, 2): (5.04, 0.06, 0.43),
           (10, 1): (5.90, 0.70, 0.10), (10, 2): (6.10, 0.66, 0.12),
           (0.5, 1): (5.02, 0.20, 0.35), (0.5, 2): (5.06, 0.30, 0.31)}
STEP = 30


@pytest.fixture(scope="module")
def tiny_payload():
    """A checkpoint dict of a tiny GPT (1 layer, 2 x 2 sheets), its config filled in per run."""
    from model import GPT, GPTConfig
    from topolm.checkpoint import make_payload

    gpt = GPT(GPTConfig(n_layer=1, n_head=1, n_embed=4, vocab_size=16, block_size=8, radius=1,
                        neighborhoods_per_batch=1))
    return make_payload(gpt, kind="pretrain", config={}, iter_num=STEP, tokenizer=None, layout_source="planted")


def plant(root, name, payload, config, val_task, morans_i=None, spatial_loss=None, finished=True, step=STEP):
    """A run folder out/<name> (log.jsonl ending with `end` when finished, one checkpoint of `config`) and,
    with morans_i given, its analysis figures/<name>/summary.json of that step."""
    from topolm.checkpoint import checkpoint_path, save_checkpoint

    run = root / "out" / name
    run.mkdir(parents=True)
    config = {"alpha": 2.5, "radius": 3, "seed": 1, "run_name": name, "out_dir": str(root / "out"),
              "position_dir": "", "max_iters": step, **config}
    records = [{"event": "start", "iter": 0, "config": config},
               {"event": "eval", "iter": 0, "val": {"loss": 9.0, "task": 9.0, "spatial": 0.1}},
               {"event": "train", "iter": step - 1, "loss": 6.0},
               {"event": "eval", "iter": step, "val": {"loss": val_task + 0.01, "task": val_task, "spatial": 0.01}}]
    records += [{"event": "end", "iter": step}] if finished else []
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_checkpoint({**payload, "config": config, "iter_num": step}, checkpoint_path(run, step))
    if morans_i is not None:
        summary = root / "figures" / name / "summary.json"
        summary.parent.mkdir(parents=True)
        summary.write_text(json.dumps({"model": {"name": name, "step": step, "mean": {
            "localizer": {"morans_i": morans_i, "null_i": 0.0}, "spatial_loss": spatial_loss}}}))
    return run


def plant_sweep(root, payload):
    for (alpha, seed), numbers in PLANTED.items():
        plant(root, f"a{alpha}-s{seed}", payload, {"alpha": alpha, "seed": seed}, *numbers)


def sweep(root, *args, check=True):
    return run_in_process([PYTHON, "sweep.py", f"analyses={root / 'figures'}", f"out={root / 'sweep'}", *args],
                          check=check)


def test_configurations_are_ordered_by_alpha_with_seed_means_and_sds(tmp_path, tiny_payload):
    plant_sweep(tmp_path, tiny_payload)
    ran = sweep(tmp_path, f"runs={tmp_path / 'out' / '*'}")
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["keys"] == ["alpha"]  # seed, run_name and out_dir differ too, but never separate configurations
    configs = table["configurations"]
    assert [c["config"]["alpha"] for c in configs] == [0, 0.5, 2.5, 10]
    assert [c["control"] for c in configs] == [True, False, False, False]
    assert [c["label"] for c in configs] == ["alpha=0", "alpha=0.5", "alpha=2.5", "alpha=10"]
    for c in configs:
        alpha = c["config"]["alpha"]
        assert sorted(r["seed"] for r in c["runs"]) == [1, 2]
        for k, measure in enumerate(("val_task_loss", "morans_i", "spatial_loss")):
            a, b = PLANTED[(alpha, 1)][k], PLANTED[(alpha, 2)][k]
            assert c[measure]["n"] == 2
            assert c[measure]["mean"] == pytest.approx((a + b) / 2, abs=1e-12)
            assert c[measure]["sd"] == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-12)  # ddof=1 of two values
    # by hand: alpha=2.5's task losses 5.10 and 5.30 -> 5.2000 +- 0.1414; the control row says so
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| alpha=2.5 |"))
    assert "5.2000 ± 0.1414" in row and "0.4500 ± 0.0707" in row and "0.2300 ± 0.0424" in row
    assert next(line for line in md.splitlines() if line.startswith("| alpha=0 |")).split("|")[2].strip() == "control"
    assert "| alpha=0.5 |  |" in md
    assert "alpha=10" in ran.stdout


def test_the_plot_draws_the_json_numbers(tmp_path, tiny_payload):
    from topolm.sweeps import plot_tradeoff

    plant_sweep(tmp_path, tiny_payload)
    sweep(tmp_path, f"runs={tmp_path / 'out' / '*'}")
    png = (tmp_path / "sweep" / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    fig = plot_tradeoff(table)
    for ax, measure in zip(fig.axes, ("morans_i", "spatial_loss")):
        assert len(ax.containers) == len(table["configurations"])
        for container, c in zip(ax.containers, table["configurations"]):
            point, caps, (xbar, ybar) = container.lines[0], container.lines[1], container.lines[2]
            x, y = c[measure], c["val_task_loss"]
            assert point.get_xydata().tolist() == [[x["mean"], y["mean"]]]
            assert xbar.get_segments()[0][:, 0] == pytest.approx([x["mean"] - x["sd"], x["mean"] + x["sd"]])
            assert ybar.get_segments()[0][:, 1] == pytest.approx([y["mean"] - y["sd"], y["mean"] + y["sd"]])
            assert point.get_marker() == ("s" if c["control"] else "o")


def test_other_differing_keys_make_configurations_and_one_seed_has_no_error_bar(tmp_path, tiny_payload):
    plant(tmp_path, "r5", tiny_payload, {"radius": 5}, 5.5, 0.3, 0.2)
    plant(tmp_path, "r3", tiny_payload, {"radius": 3}, 5.4, 0.5, 0.1)
    plant(tmp_path, "site-alpha", tiny_payload, {"alpha": {"attn": 0, "mlp": 0}, "radius": 3}, 5.0, 0.0, 0.4)
    plant(tmp_path, "sites-off", tiny_payload, {"alpha_attn": 0.0, "alpha_mlp": 0.0}, 5.1, 0.0, 0.4)
    plant(tmp_path, "attn-only", tiny_payload, {"alpha_attn": None, "alpha_mlp": 0.0}, 5.2, 0.2, 0.3)
    sweep(tmp_path, f"runs={tmp_path / 'out' / 'r5'},{tmp_path / 'out' / 'r*'},{tmp_path / 'out' / 's*'},"
                    f"{tmp_path / 'out' / 'attn-only'}")
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["keys"] == ["alpha", "alpha_attn", "alpha_mlp", "radius"]
    configs = table["configurations"]
    # alpha first: numbers (then alpha_attn: 0.0 before null, ..., radius 3 before 5), then the per-site alpha
    assert [[c["config"][k] for k in table["keys"]] for c in configs] == [
        [2.5, 0.0, 0.0, 3], [2.5, None, 0.0, 3], [2.5, None, None, 3], [2.5, None, None, 5],
        [{"attn": 0, "mlp": 0}, None, None, 3]]
    # controls: every site's weight 0 (alpha_attn and alpha_mlp both 0, or a per-site alpha of zeros)
    assert [c["control"] for c in configs] == [True, False, False, False, True]
    assert [c["label"] for c in configs][1] == "alpha=2.5, alpha_attn=null, alpha_mlp=0, radius=3"
    assert [len(c["runs"]) for c in configs] == [1] * 5  # r5 named twice counts once
    configs = [c for c in configs if c["config"]["alpha_attn"] is None and c["config"]["alpha_mlp"] is None]
    assert configs[0]["val_task_loss"] == {"mean": 5.4, "sd": None, "n": 1}
    assert "| 5.4000 |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_keys_of_what_training_measures_do_not_separate_configurations(tmp_path, tiny_payload):
    """Runs of one configuration, one trained before train.py had the topography keys, are one configuration."""
    plant(tmp_path, "old", tiny_payload, {}, 5.0, 0.4, 0.1)
    plant(tmp_path, "new", tiny_payload, {"seed": 2, "topography": True, "topography_heldout_tokens": 2048,
                                          "topography_image_interval": 500}, 5.2, 0.6, 0.1)
    sweep(tmp_path, f"runs={tmp_path / 'out' / '*'}")
    (config,) = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["configurations"]
    assert len(config["runs"]) == 2 and config["morans_i"]["mean"] == pytest.approx(0.5)


def test_bad_input_is_refused_with_one_line_before_anything_is_written(tmp_path, tiny_payload):
    plant(tmp_path, "done", tiny_payload, {}, 5.0, 0.1, 0.2)
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / 'nothing-*'}", check=False), "no run folder matched")
    plant(tmp_path, "running", tiny_payload, {"seed": 2}, 5.0, 0.1, 0.2, finished=False)
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / '*'}", check=False),
                   "running/log.jsonl: the run has not finished", "'eval' at iteration 30")
    (tmp_path / "out" / "not-a-run").mkdir()
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / 'done'},{tmp_path / 'out' / 'not-a-run'}", check=False),
                   "not-a-run: no log.jsonl")
    plant(tmp_path, "unanalysed", tiny_payload, {"seed": 3}, 5.0)
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / 'unanalysed'}", "analyze=false", check=False),
                   "no analysis of", "analyze=true")
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / 'done'}", "contrast=verb_noun", check=False),
                   "no contrast 'verb_noun'", "localizer")
    stale = tmp_path / "figures" / "done" / "summary.json"
    stale.write_text(stale.read_text().replace(f'"step": {STEP}', '"step": 10'))
    one_error_line(sweep(tmp_path, f"runs={tmp_path / 'out' / 'done'}", check=False), "analyses step 10 of done")
    assert not (tmp_path / "sweep").exists()


FAST = dict(permutations=9, null_shuffles=2, heldout_tokens=256)


def test_a_run_without_analysis_is_measured_as_analyze_py_measures_it(tmp_path, gpt2_run):
    ran = run_in_process([PYTHON, "analyze.py", f"ckpt={gpt2_run.run}", f"out={tmp_path / 'analyze'}", "device=cpu",
                          *[f"{k}={v}" for k, v in FAST.items()]])
    assert ran.returncode == 0
    expected = json.loads((tmp_path / "analyze" / "summary.json").read_text())["model"]
    args = [f"runs={gpt2_run.run}", f"analyses={tmp_path / 'none'}", f"out={tmp_path / 'sweep'}", "device=cpu",
            *[f"{k}={FAST[k]}" for k in ("permutations", "null_shuffles", "heldout_tokens")]]
    ran = run_in_process([PYTHON, "sweep.py", *args])
    assert "analysing" in ran.stdout
    measured = json.loads((tmp_path / "sweep" / "analyses" / "run" / "summary.json").read_text())["model"]
    for key in ("step", "sites", "mean", "heldout", "provenance", "sheet", "alpha_sites"):
        assert measured[key] == expected[key], key
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    (config,) = table["configurations"]
    assert config["morans_i"]["mean"] == expected["mean"]["localizer"]["morans_i"]
    assert config["spatial_loss"]["mean"] == expected["mean"]["spatial_loss"]
    last_eval = [json.loads(line) for line in (gpt2_run.run / "log.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "eval"][-1]
    assert config["val_task_loss"]["mean"] == last_eval["val"]["task"]
    # a second sweep into the same folder reuses that analysis
    again = run_in_process([PYTHON, "sweep.py", *args, "overwrite=true"])
    assert "analysing" not in again.stdout
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["configurations"] == table["configurations"]
