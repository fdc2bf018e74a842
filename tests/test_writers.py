"""Writers under a full disk or a file-size limit, and commands that check their output folder before the work.

A file-size limit (`ulimit -f`, RLIMIT_FSIZE) makes the system refuse a write with EFBIG, as a full disk
does with ENOSPC; Python ignores the SIGXFSZ that comes with it, so the writer sees the error. Each case
checks one `error:` line naming the file, no partial file left, and the earlier file kept."""
import json
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, one_error_line, overrides, write_pattern_data
from topolm.config import UserError
from topolm.files import atomic_write


@contextmanager
def file_size_limit(n_bytes: int):
    """Lower this process's soft RLIMIT_FSIZE to n_bytes for the block (the hard limit is untouched)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


WRITERS = {
    "torch.save": lambda f: torch.save({"w": torch.zeros(50_000)}, f),
    "np.savez": lambda f: np.savez(f, a=np.arange(50_000)),
    "bytes": b"x" * 200_000,
    "text": "y" * 200_000,
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_refused_write_is_one_line_naming_the_file_and_keeps_the_earlier_file(tmp_path, kind):
    target = tmp_path / "out" / "result.bin"
    atomic_write(target, b"earlier")
    with file_size_limit(64 * 1024), pytest.raises(UserError) as refused:
        atomic_write(target, WRITERS[kind])
    message = str(refused.value)
    assert str(target) in message and "File too large" in message and "\n" not in message
    assert "free space" in message
    assert target.read_bytes() == b"earlier" and leftovers(tmp_path) == []


def test_a_figure_that_cannot_be_written_names_its_file(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from topolm.figures import save_figure

    fig = plt.figure(figsize=(20, 20), dpi=100)
    fig.add_subplot().imshow(np.random.default_rng(0).random((400, 400)))
    with file_size_limit(16 * 1024), pytest.raises(UserError, match="maps.png"):
        save_figure(fig, tmp_path / "maps.png")
    assert list(tmp_path.iterdir()) == []


def test_token_files_that_cannot_be_written_name_the_file_and_keep_the_earlier_ones(tmp_path):
    from topolm.corpus import TokenFiles

    with TokenFiles(tmp_path) as out:
        out.write("train", np.arange(10))
        out.write("val", np.arange(10))
        out.commit()
    before = (tmp_path / "train.bin").read_bytes()
    with file_size_limit(64 * 1024), pytest.raises(UserError, match="train.bin"):
        with TokenFiles(tmp_path) as out:
            for _ in range(40):
                out.write("train", np.arange(4096))
    assert (tmp_path / "train.bin").read_bytes() == before and leftovers(tmp_path) == []


def test_an_export_that_cannot_be_written_is_one_line_and_keeps_the_earlier_export(tmp_path):
    from model import GPT, GPTConfig
    from positions import random_layout
    from topolm.checkpoint import make_payload
    from topolm.hf import export_hf

    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embed=36, block_size=16, vocab_size=64, radius=2)
    gpt = GPT(config, random_layout(2, 36, 0))
    ckpt = make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="test")
    folder = tmp_path / "hf"
    export_hf(gpt, ckpt, folder, "test")
    earlier = (folder / "model.safetensors").read_bytes()
    with file_size_limit(16 * 1024), pytest.raises(UserError) as refused:
        export_hf(gpt, ckpt, folder, "test", overwrite=True)
    assert str(folder) in str(refused.value) and "\n" not in str(refused.value)
    assert (folder / "model.safetensors").read_bytes() == earlier and leftovers(tmp_path) == []


def limited(n_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_train_py_under_a_file_size_limit_stops_with_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    keys = dict(dataset=str(data), out_dir=str(tmp_path / "out"), run_name="r", save_interval=10)
    first = subprocess.run([PYTHON, "train.py", "train_shakespeare.yaml", *overrides(**keys, max_iters=10)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "out" / "r"
    earlier = (run / "ckpt-0000010.pt").read_bytes()
    # big enough for the log, too small for a checkpoint
    proc = subprocess.run([PYTHON, "train.py", "train_shakespeare.yaml",
                           *overrides(**keys, max_iters=20, init_from="resume")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(len(earlier) // 2))
    line = one_error_line(proc, str(run / "ckpt-0000020.pt"), "File too large")
    assert "Traceback" not in proc.stderr and line
    assert not (run / "ckpt-0000020.pt").exists() and (run / "ckpt-0000010.pt").read_bytes() == earlier
    assert leftovers(run) == []


@pytest.mark.torchrun
def test_under_torchrun_a_checkpoint_that_cannot_be_written_stops_every_rank(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    run = tmp_path / "out" / "r"
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launcher, "train.py", "train_shakespeare.yaml",
                           *overrides(dataset=str(data), out_dir=str(tmp_path / "out"), run_name="r", max_iters=10,
                                      save_interval=10, backend="gloo", gradient_accumulation_steps=2)],
                          cwd=REPO, capture_output=True, text=True, timeout=240, preexec_fn=limited(20_000))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(run / "ckpt-0000010.pt") in errors[0], proc.stderr[-3000:]
    assert leftovers(run) == []


def test_require_writable_refuses_a_folder_that_is_a_file(tmp_path):
    from topolm.files import require_writable

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is a file"):
        require_writable(blocker)
    with pytest.raises(UserError, match="cannot write into"):
        require_writable(blocker / "sub")
    assert require_writable(tmp_path / "new" / "folder").is_dir() and leftovers(tmp_path) == []


def test_blimp_checks_where_it_writes_before_scoring(tmp_path, monkeypatch, capsys):
    """An output the system refuses is reported before any pair is scored (the scoring would otherwise run
    first and be lost)."""
    import blimp
    from model import GPT, GPTConfig
    from positions import random_layout
    from topolm.checkpoint import make_payload, save_checkpoint, tokenizer_for
    from topolm.config import cli_main

    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embed=36, block_size=16, vocab_size=50304, radius=2),
              random_layout(2, 36, 0))
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=tokenizer_for(50304),
                                 layout_source="test"), ckpt)
    pairs = tmp_path / "blimp"
    pairs.mkdir()
    (pairs / "anaphor_gender_agreement.jsonl").write_text(json.dumps(
        {"sentence_good": "She saw herself.", "sentence_bad": "She saw himself.", "UID": "anaphor_gender_agreement",
         "linguistics_term": "anaphor_agreement"}) + "\n")
    (tmp_path / "blocker").write_text("")

    def scored(*args, **kwargs):
        raise AssertionError("pairs were scored before the output was checked")
    monkeypatch.setattr(blimp, "score_blimp", scored)
    monkeypatch.setattr(sys, "argv", ["blimp.py", f"ckpt={ckpt}", f"data_dir={pairs}",
                                      f"out={tmp_path / 'blocker' / 'results.json'}"])
    with pytest.raises(SystemExit) as stop:
        cli_main(blimp.main)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "blocker is a file, not a folder" in lines[0]
