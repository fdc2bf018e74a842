"""Where inputs come from and where outputs go: Hub datasets (the local cache first; offline, one line within
seconds), out= folders, paths relative to the current folder, the runs a missing ckpt= suggests, what a
stop and a resume say, make compare's reuse of the demo's run, and text inputs refused with their file and
line (bytes that are not UTF-8, escaped lone surrogates, empty fields)."""
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import ablate
import analyze
import blimp
import export_hf
import finetune
import glue_summary
import import_research
import init_pos
import sample
import train
from conftest import (PYTHON, REPO, StopAtOnce, one_error_line, overrides, run_in_process, run_main, run_script,
                      write_pattern_data, write_units)

NO_HUB = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
DEAD_HUB = "https://127.0.0.1:9"  # a closed local port: the connection is refused at once, nothing leaves the machine


def hub_env(tmp_path, **extra) -> dict:
    """An environment in which no test can reach the Hub: an empty HF_HOME in tmp, no proxy, the Hub at a
    dead local address, and the offline variables unless `extra` replaces them."""
    env = {k: v for k, v in os.environ.items() if k not in PROXIES and not k.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": DEAD_HUB, "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", **NO_HUB, **extra}


def timed(args, env, cwd=REPO):
    start = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def fake_units(ckpt, path):
    """A units.npz for `ckpt` as analyze.py writes it (site names, positions, provenance, localizer t of
    every unit)."""
    from topolm.checkpoint import load_model

    model, _, _ = load_model(ckpt)
    return write_units(path, ckpt, t_localizer=np.random.default_rng(0).normal(size=(len(model.site_names),
                                                                                    model.config.n_embed)))


# ----------------------------------------------------------------------------- the Hub


@pytest.mark.parametrize("offline", [{}, {"HF_HUB_OFFLINE": ""}, {"HF_DATASETS_OFFLINE": ""}],
                         ids=["both", "datasets-only", "hub-only"])
def test_blimp_offline_without_data_dir_is_one_line_within_seconds(gpt2_run, tmp_path, offline):
    proc, seconds = timed([PYTHON, "blimp.py", f"ckpt={gpt2_run.run}", "paradigms=adjunct_island"],
                          hub_env(tmp_path, **offline))
    line = one_error_line(proc, "cannot load nyu-mll/blimp/adjunct_island", "not in the local Hugging Face cache",
                          "data_dir=")
    assert "Retrying" not in proc.stderr + proc.stdout and seconds < 20, (line, seconds)


def test_blimp_without_network_and_without_offline_variables_fails_at_once(gpt2_run, tmp_path):
    proc, seconds = timed([PYTHON, "blimp.py", f"ckpt={gpt2_run.run}", "paradigms=adjunct_island"],
                          hub_env(tmp_path, HF_HUB_OFFLINE="", HF_DATASETS_OFFLINE=""))
    one_error_line(proc, "nyu-mll/blimp/adjunct_island", "127.0.0.1 cannot be reached", "data_dir=")
    assert "Retrying" not in proc.stderr and seconds < 20, seconds


def test_ablate_offline_without_data_dir_is_one_line_without_retry_noise(gpt2_run, tmp_path):
    units = fake_units(gpt2_run.ckpt, tmp_path / "units.npz")
    proc, seconds = timed([PYTHON, "ablate.py", f"ckpt={gpt2_run.run}", f"units={units}", "k=2",
                           "paradigms=adjunct_island"], hub_env(tmp_path))
    one_error_line(proc, "cannot load nyu-mll/blimp/adjunct_island", "HF_HUB_OFFLINE=1", "data_dir=")
    assert "Retrying" not in proc.stderr and seconds < 20, seconds


def test_finetune_offline_without_data_dir_names_glue_and_data_dir(gpt2_run, tmp_path):
    proc, seconds = timed([PYTHON, "finetune.py", f"ckpt={gpt2_run.run}", "task=rte", f"out_dir={tmp_path / 'ft'}",
                           "device=cpu", "max_length=16"], hub_env(tmp_path))
    one_error_line(proc, "cannot load nyu-mll/glue/rte", "data_dir=")
    assert seconds < 20 and not (tmp_path / "ft" / "rte" / "log.jsonl").exists()


def test_fineweb_prepare_offline_names_files_not_the_paths_given(tmp_path):
    proc, seconds = timed([PYTHON, "data/fineweb/prepare.py", "--out_dir", str(tmp_path / "out")], hub_env(tmp_path))
    line = one_error_line(proc, "HuggingFaceFW/fineweb-edu/sample-10BT", "--files")
    assert "check the paths given" not in line and seconds < 20
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def cache_blimp_paradigm(hf_home: Path, paradigm: str, rows: list[dict]) -> None:
    """Put `rows` into the datasets cache under HF_HOME as nyu-mll/blimp's `paradigm`, laid out as a
    download of it leaves them (built from a local json file; nothing is downloaded)."""
    build = hf_home.parent / "build"
    build.mkdir(parents=True)
    (build / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = f"""
import datasets, glob, json, os, shutil
datasets.load_dataset("json", data_files={str(build / 'rows.jsonl')!r}, split="train", cache_dir={str(build)!r})
src = next(p for p in glob.glob({str(build)!r} + "/json/*/*/*") if os.path.isdir(p))
dst = os.path.join(datasets.config.HF_DATASETS_CACHE, "nyu-mll___blimp", {paradigm!r}, "0.0.0", "cached")
os.makedirs(dst)
for name in os.listdir(src):
    shutil.copy(os.path.join(src, name), os.path.join(dst, name.replace("json-", "blimp-")))
info = json.load(open(os.path.join(dst, "dataset_info.json")))
info.update(config_name={paradigm!r}, dataset_name="blimp")
json.dump(info, open(os.path.join(dst, "dataset_info.json"), "w"))
"""
    run_script([PYTHON, "-c", script], env={"HF_HOME": str(hf_home), **NO_HUB})


def test_blimp_reads_the_local_cache_first_without_the_network(gpt2_run, tmp_path):
    """A paradigm in the datasets cache is scored with the Hub unreachable and no offline variable set: the
    cache is read before any request (else huggingface_hub would retry for about 25 s first)."""
    rows = [json.loads(line) for line in (gpt2_run.pairs / "known_verb.jsonl").read_text().splitlines()]
    cache_blimp_paradigm(tmp_path / "hf", "adjunct_island", rows)
    out = tmp_path / "results.json"
    proc, seconds = timed([PYTHON, "blimp.py", f"ckpt={gpt2_run.run}", "paradigms=adjunct_island", f"out={out}"],
                          hub_env(tmp_path, HF_HUB_OFFLINE="", HF_DATASETS_OFFLINE=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["overall"]["n"] == len(rows) == 8 and results["data"] == "nyu-mll/blimp"
    assert "Retrying" not in proc.stderr and seconds < 20, seconds


# ----------------------------------------------------------------------------- out= folders


@pytest.mark.parametrize("form", ["slash", "existing"])
def test_blimp_out_naming_a_folder_writes_inside_it(gpt2_run, tmp_path, form):
    folder = tmp_path / "results"
    if form == "existing":
        folder.mkdir()
    value = f"{folder}/" if form == "slash" else str(folder)
    ran = run_main(blimp, [f"ckpt={gpt2_run.run}", f"data_dir={gpt2_run.pairs}", f"out={value}", "device=cpu"])
    assert ran.returncode == 0, ran.stderr
    written = folder / f"{gpt2_run.ckpt.name}.blimp.json"
    assert folder.is_dir() and json.loads(written.read_text())["overall"]["n"] == 16
    assert f"wrote {written}" in ran.stdout


def test_ablate_out_with_a_trailing_slash_writes_inside_the_folder(gpt2_run, tmp_path):
    units = fake_units(gpt2_run.ckpt, tmp_path / "units.npz")
    ran = run_main(ablate, [f"ckpt={gpt2_run.run}", f"units={units}", "k=2", f"data_dir={gpt2_run.pairs}",
                            f"out={tmp_path / 'abl'}/", "device=cpu"])
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "abl" / f"{gpt2_run.ckpt.name}.ablation-k2.json").read_text())["k"] == [2]
    assert (tmp_path / "abl" / f"{gpt2_run.ckpt.name}.ablation-k2.png").is_file()  # the curves beside it


def test_glue_summary_json_naming_a_folder_writes_inside_it(tmp_path):
    task = tmp_path / "finetuned" / "rte"
    task.mkdir(parents=True)
    (task / "metrics.json").write_text(json.dumps({"splits": {"validation": {"accuracy": 0.5}}, "best_iter": 3}))
    (tmp_path / "tables").mkdir()
    ran = run_main(glue_summary, [f"dir={tmp_path / 'finetuned'}", f"json={tmp_path / 'tables'}"])
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "tables" / "glue_summary.json").read_text())["rows"][0]["task"] == "rte"


def test_import_research_out_folder_gets_a_run_checkpoint(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "research-ckpt-small"
    ran = run_main(import_research, [f"ckpt={fixture / 'ckpt-resid.pt'}", f"positions={fixture / 'positions-resid'}",
                                     f"out={tmp_path / 'imported'}/"])
    assert ran.returncode == 0, ran.stderr
    (written,) = (tmp_path / "imported").glob("ckpt-*.pt")
    assert f"wrote {written}" in ran.stdout
    from topolm.checkpoint import find_checkpoint
    assert find_checkpoint(tmp_path / "imported") == written


# ----------------------------------------------------------------------------- paths relative to the current folder


def test_analyze_reads_stimuli_and_heldout_relative_to_the_current_folder(gpt2_run, tmp_path, monkeypatch):
    shutil.copytree(REPO / "stimuli", tmp_path / "my-stimuli")
    (tmp_path / "held.txt").write_text("The dog runs. The cats sleep. " * 40)
    monkeypatch.chdir(tmp_path)
    ran = run_main(analyze, [f"ckpt={gpt2_run.run}", "stimuli=my-stimuli", "heldout=held.txt", "out=maps/",
                             "permutations=9", "null_shuffles=2", "device=cpu"])
    assert ran.returncode == 0, ran.stderr[-2000:]
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert summary["analysis"]["stimuli"] == "my-stimuli" and summary["model"]["heldout"]["source"] == "held.txt"


def test_init_pos_reads_a_relative_data_file_from_the_current_folder(tmp_path, monkeypatch):
    write_pattern_data(tmp_path, vocab=64)
    monkeypatch.chdir(tmp_path)
    ran = run_main(init_pos, ["layout=swapopt", "data=train.bin", "n_layer=1", "n_head=2", "n_embed=36",
                              "vocab_size=64", "radius=3", "n_neighborhoods=2", "local_steps=2", "n_tokens=256",
                              "block_size=32", "out=./set"])
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "set" / "positions.npy").is_file()


# ----------------------------------------------------------------------------- which run to load


def fake_runs(root: Path) -> None:
    """out/ with two runs that hold a checkpoint (old, new) and one that holds none."""
    for name, age in (("old", 200), ("new", 100)):
        (root / "out" / name).mkdir(parents=True)
        ckpt = root / "out" / name / "ckpt-0000010.pt"
        ckpt.write_bytes(b"")
        os.utime(ckpt, (time.time() - age, time.time() - age))
    (root / "out" / "empty").mkdir()


@pytest.mark.parametrize("module", [sample, analyze, blimp, ablate, export_hf, finetune],
                         ids=lambda m: m.__name__)
def test_a_missing_ckpt_suggests_the_newest_runs_in_out(module, tmp_path, monkeypatch):
    fake_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run_main(module, []), "ckpt= is required")
    assert line.endswith("newest runs with a checkpoint in out/: ckpt=out/new, ckpt=out/old"), line


def test_a_checkpoint_that_is_not_there_suggests_the_runs_and_none_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run_main(sample, ["ckpt=out/shakespeare"]), "checkpoint not found: out/shakespeare")
    assert "no run folder in out/ holds a checkpoint yet" in line and "python train.py" in line
    fake_runs(tmp_path)
    line = one_error_line(run_main(blimp, ["ckpt=out/empty"]), "no checkpoint (ckpt-*.pt) in out/empty")
    assert line.endswith("ckpt=out/new, ckpt=out/old")


# ----------------------------------------------------------------------------- stop and resume


def test_a_stopped_run_prints_its_resume_command_and_the_resume_says_where_it_resumed(tmp_path, monkeypatch):
    data = write_pattern_data(tmp_path / "data")
    args = ["train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(tmp_path / "runs"), max_iters=6)]
    monkeypatch.setattr(train, "StopFlag", StopAtOnce)
    ran = run_main(train, args)
    assert ran.returncode == 0, ran.stderr
    (line,) = [s for s in ran.stdout.splitlines() if "continue with: " in s]
    command = shlex.split(line.split("continue with: ", 1)[1])
    run_dir = next((tmp_path / "runs").iterdir())
    assert command[0] == "python" and Path(command[1]).name == "train.py" and command[2] == "train_shakespeare.yaml"
    assert command[-3:] == [f"out_dir={tmp_path / 'runs'}", f"run_name={run_dir.name}", "init_from=resume"]
    monkeypatch.undo()
    resumed = run_main(train, command[2:])
    assert resumed.returncode == 0, resumed.stderr
    # the stop is honoured in the evaluation at iteration 0, before any step
    assert f"resumed from iteration 0 ({run_dir / 'ckpt-0000000.pt'})" in resumed.stdout.splitlines()
    assert (run_dir / "ckpt-0000006.pt").is_file()


# ----------------------------------------------------------------------------- make compare


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$CALLS"
case "$1" in train.py) for a in "$@"; do case "$a" in run_name=*) mkdir -p "out/${a#run_name=}" &&
  echo '{"event": "end", "iter": 1}' > "out/${a#run_name=}/log.jsonl";; esac; done;; esac
"""


def make_in(folder: Path, target: str, **variables) -> list[str]:
    """Run `make target` of the repository's Makefile in `folder` with a Python that only records its
    arguments (train.py also leaves a finished run's log); returns the recorded command lines."""
    shutil.copy(REPO / "Makefile", folder / "Makefile")
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-hf.txt"):
        shutil.copy(REPO / name, folder / name)
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed").touch()
    calls = folder / "calls.txt"
    calls.unlink(missing_ok=True)
    args = ["make", "-s", target, "VENV=venv", *(f"{k}={v}" for k, v in variables.items())]
    subprocess.run(args, cwd=folder, env={**os.environ, "CALLS": str(calls)}, check=True, capture_output=True)
    return calls.read_text().splitlines()


def test_make_compare_reuses_the_finished_demo_run(tmp_path):
    trained = [c for c in make_in(tmp_path, "demo") if c.startswith("train.py")]
    assert len(trained) == 1
    demo = trained[0].split("run_name=")[1]
    calls = make_in(tmp_path, "compare")
    assert [c for c in calls if c.startswith("train.py")] == [
        f"train.py train_shakespeare.yaml run_name={demo}-control alpha=0"]
    assert calls[-1].startswith(f"analyze.py ckpt=out/{demo} compare=out/{demo}-control")
    again = make_in(tmp_path, "compare")  # both runs finished: nothing is trained, the maps are redrawn
    assert [c for c in again if c.startswith("train.py")] == [] and again[-1] == calls[-1]
    fresh = make_in(tmp_path, "compare", RUN="other")
    assert [c.split()[2] for c in fresh if c.startswith("train.py")] == ["run_name=other", "run_name=other-control"]


def test_make_compare_in_a_fresh_clone_trains_both_models(tmp_path):
    calls = make_in(tmp_path, "compare")
    trained = [c for c in calls if c.startswith("train.py")]
    demo = trained[0].split("run_name=")[1]
    assert trained == [f"train.py train_shakespeare.yaml run_name={demo}",
                       f"train.py train_shakespeare.yaml run_name={demo}-control alpha=0"]


# ----------------------------------------------------------------------------- text inputs


def test_heldout_text_that_is_not_utf8_is_one_line_naming_file_line_and_byte(gpt2_run, tmp_path):
    held = tmp_path / "held.txt"
    held.write_bytes(b"The dog runs.\nThe caf\xe9 sleeps.\n")
    line = one_error_line(run_main(analyze, [f"ckpt={gpt2_run.run}", f"heldout={held}", f"out={tmp_path / 'a'}",
                                             "device=cpu"]), f"{held} line 2, byte 8: not valid UTF-8")
    assert not (tmp_path / "a").exists(), line


@pytest.mark.parametrize("row,message", [
    ({"sentence_good": "", "sentence_bad": "The dog run."}, "line 2: 'sentence_good' is empty"),
    ({"sentence_good": "The dog runs.", "sentence_bad": "  "}, "line 2: 'sentence_bad' is empty"),
    ({"sentence_good": "The dog runs."}, "line 2: no field 'sentence_bad'"),
    ({"sentence_good": "The dog runs \ud83d.", "sentence_bad": "x"}, "line 2: 'sentence_good' holds the escape \\ud83d"),
], ids=["empty", "blank", "missing", "surrogate"])
def test_blimp_rows_are_refused_naming_file_line_and_field(gpt2_run, tmp_path, row, message):
    folder = tmp_path / "pairs"
    folder.mkdir()
    good = {"sentence_good": "The dog runs.", "sentence_bad": "The dog run."}
    (folder / "p.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    one_error_line(run_main(blimp, [f"ckpt={gpt2_run.run}", f"data_dir={folder}", "device=cpu"]),
                   f"{folder / 'p.jsonl'} {message}")


@pytest.mark.parametrize("text,message", [
    ('{"text": "a"}\n{"text": "smile \\ud83d!"}\n', "line 2: 'text' holds the escape \\ud83d"),
    ('{"text": "a"}\n{"text": "ok \\ud83d\\ude00", "meta": ["\\udc00"]}\n', "line 2: 'meta'[0] holds the escape \\udc00"),
    ('{"text": "a"}\n{"text": ""}\n', "line 2: 'text' is empty"),
    ('[{"text": "a"},\n {"text": "\\ud800"}]', "line 2: [1]['text'] holds the escape \\ud800"),
], ids=["jsonl-high", "jsonl-low-in-other-field", "jsonl-empty", "json-array"])
def test_fineweb_files_with_lone_surrogates_or_empty_text_are_one_line(tmp_path, text, message):
    source = tmp_path / ("docs.json" if text.startswith("[") else "docs.jsonl")
    source.write_text(text)
    proc = run_in_process([PYTHON, "data/fineweb/prepare.py", "--files", str(source), "--out_dir", str(tmp_path / "o"),
                           "--num_proc", "1"], check=False)
    one_error_line(proc, f"{source} {message}")
    assert not (tmp_path / "o" / "train.bin").exists()


def test_a_valid_surrogate_pair_and_an_escaped_backslash_are_text(tmp_path):
    from topolm.files import read_jsonl

    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "\\ud83d\\ude00 and \\\\ud83d"}\n')
    assert [r["text"] for _, r in read_jsonl(path, ("text",))] == ["\U0001F600 and \\ud83d"]


def test_fineweb_parquet_with_an_empty_document_names_the_row(tmp_path):
    import pandas as pd

    source = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["a document", "another", ""]}).to_parquet(source)
    proc = run_in_process([PYTHON, "data/fineweb/prepare.py", "--files", str(source), "--out_dir", str(tmp_path / "o"),
                           "--num_proc", "1"], check=False)
    one_error_line(proc, f"{source}, row 3: 'text' is empty")


def test_stimuli_with_an_empty_field_are_refused_naming_file_and_line(gpt2_run, tmp_path):
    shutil.copytree(REPO / "stimuli", tmp_path / "stim")
    lines = (tmp_path / "stim" / "localizer.tsv").read_text().split("\n")
    lines[3] = "\t".join(lines[3].split("\t")[:2] + [""])
    (tmp_path / "stim" / "localizer.tsv").write_text("\n".join(lines))
    one_error_line(run_main(analyze, [f"ckpt={gpt2_run.run}", f"stimuli={tmp_path / 'stim'}", "device=cpu",
                                      f"out={tmp_path / 'a'}"]),
                   "localizer.tsv line 4: the field 'text' is empty or missing")


def test_the_fineweb_preparer_help_prints(tmp_path):
    """Its description names the lone-surrogate escape as text; printing it must not fail."""
    proc = run_script([PYTHON, "data/fineweb/prepare.py", "--help"])
    assert "--files" in proc.stdout and "\\ud83d" in proc.stdout
