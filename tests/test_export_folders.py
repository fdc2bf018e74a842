"""Exported Hugging Face folders in place of checkpoints: analyze.py, blimp.py, ablate.py and sample.py load
either through topolm.checkpoint.load_model and give the same results; a folder without its unit positions
(a plain GPT-2) is refused by each, before anything is written."""
import json
import shutil

import numpy as np
import pytest

import ablate
import analyze
import blimp
import export_hf
import sample
from conftest import one_error_line, run_main, write_units

pytest.importorskip("transformers")

ANALYSIS = ["permutations=19", "null_shuffles=3", "heldout_tokens=256", "fwhm=2"]


@pytest.fixture(scope="module")
def exported(gpt2_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    shutil.copytree(gpt2_run.run, root / "run")
    export_hf.main([f"ckpt={root / 'run'}", f"out={root / 'hf'}"])
    bare = root / "bare"
    shutil.copytree(root / "hf", bare)
    (bare / "positions.npy").unlink()
    return {"run": root / "run", "hf": root / "hf", "bare": bare, "pairs": gpt2_run.pairs, "data": gpt2_run.data}


def _without_paths(x, paths):
    """`x` with every string that names one of `paths` replaced by a placeholder."""
    if isinstance(x, dict):
        return {k: _without_paths(v, paths) for k, v in x.items()}
    if isinstance(x, list):
        return [_without_paths(v, paths) for v in x]
    if isinstance(x, str) and any(p in x for p in paths):
        return "<path>"
    return x


def test_analysis_of_the_export_equals_the_checkpoints(exported, tmp_path):
    heldout = f"heldout={exported['data'] / 'val.bin'}"
    for name in ("run", "hf"):
        ran = run_main(analyze, [f"ckpt={exported[name]}", f"out={tmp_path / name}", heldout, *ANALYSIS])
        assert ran.returncode == 0, ran.stderr[-2000:]
    a = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = json.loads((tmp_path / "hf" / "summary.json").read_text())
    paths = [str(exported["run"]), str(exported["hf"]), str(tmp_path)]
    assert a["model"]["provenance"]["weights_sha256"] == b["model"]["provenance"]["weights_sha256"]
    assert a["model"]["provenance"]["step"] == b["model"]["provenance"]["step"] == 12  # the export keeps its source's step
    assert a["model"].pop("name") == "run" and b["model"].pop("name") == "hf"  # each the folder's name
    assert _without_paths(a, paths) == _without_paths(b, paths)
    ua, ub = np.load(tmp_path / "run" / "units.npz"), np.load(tmp_path / "hf" / "units.npz")
    assert sorted(ua.files) == sorted(ub.files)
    for key in ua.files:
        if key != "provenance":
            np.testing.assert_array_equal(ua[key], ub[key], err_msg=key)


def test_blimp_and_ablation_of_the_export_equal_the_checkpoints(exported, tmp_path):
    t = np.random.default_rng(0).normal(size=(4, 36))
    units = write_units(tmp_path / "units.npz", exported["run"], t_localizer=t, selective_localizer=t > 1.0)
    results = {}
    for name in ("run", "hf"):
        out = tmp_path / f"{name}.blimp.json"
        ran = run_main(blimp, [f"ckpt={exported[name]}", f"data_dir={exported['pairs']}", f"out={out}", "save_pairs=true"])
        assert ran.returncode == 0, ran.stderr[-2000:]
        results[name] = json.loads(out.read_text())
    a, b = results["run"], results["hf"]
    assert a["pairs"] == b["pairs"] and a["paradigms"] == b["paradigms"] and a["overall"] == b["overall"]
    assert a["provenance"]["weights_sha256"] == b["provenance"]["weights_sha256"]

    ablations = {}
    for name in ("run", "hf"):
        out = tmp_path / f"{name}.ablation.json"
        ran = run_main(ablate, [f"ckpt={exported[name]}", f"units={units}", f"data_dir={exported['pairs']}",
                                "k=3", f"out={out}", f"dataset={exported['data']}", "val_batches=2", "val_batch_size=4"])
        assert ran.returncode == 0, ran.stderr[-2000:]
        ablations[name] = json.loads(out.read_text())
    paths = [str(exported["run"]), str(exported["hf"]), str(tmp_path)]
    assert _without_paths(ablations["run"], paths) == _without_paths(ablations["hf"], paths)


def test_sampling_the_export_equals_the_checkpoints(exported):
    texts = [run_main(sample, [f"ckpt={exported[name]}", "start=the", "num_samples=2", "max_new_tokens=12"]).stdout
             for name in ("run", "hf")]
    assert texts[0].split("\n", 1)[1] == texts[1].split("\n", 1)[1]  # the first line names the model's path


@pytest.mark.parametrize("command", ["analyze", "blimp", "ablate", "sample"])
def test_a_folder_without_positions_is_refused_before_anything_is_written(exported, tmp_path, command):
    module = {"analyze": analyze, "blimp": blimp, "ablate": ablate, "sample": sample}[command]
    out = tmp_path / "out"
    argv = {"analyze": [f"out={out}"], "blimp": [f"out={out}", f"data_dir={exported['pairs']}"],
            "ablate": [f"out={out}", f"data_dir={exported['pairs']}", f"units={tmp_path / 'units.npz'}"],
            "sample": ["start=the"]}[command]
    ran = run_main(module, [f"ckpt={exported['bare']}", *argv])
    one_error_line(ran, str(exported["bare"]), "without unit positions", "export_hf.py")
    assert not out.exists()
