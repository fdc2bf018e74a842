"""Stop signals in the inference commands (analyze.py, blimp.py, ablate.py, sample.py): SIGTERM, SIGINT or
SIGUSR1 ends them within seconds with one line and exit status 128 + the signal's number, leaving no part
of their outputs. (train.py's and finetune.py's stops, which save and exit 0: tests/test_train.py and
tests/test_finetune.py.)"""
import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import analyze
import blimp
from conftest import STOP_BOUND_S, PYTHON, REPO, run_main, write_units
from topolm.checkpoint import load_model
from topolm.signals import Stopped, exit_on_stop


class Watched:
    """A command running in the background, its stdout and stderr read as they come (tqdm's bars too)."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.chunks = {"out": [], "err": []}
        self.readers = [threading.Thread(target=self._read, args=(stream, self.chunks[name]), daemon=True)
                        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, chunks):
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            chunks.append(chunk)

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while text not in self.text("out") + self.text("err"):
            if time.time() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"never printed {text!r}:\n{self.text('out')[-2000:]}\n{self.text('err')[-2000:]}")
            time.sleep(0.02)

    def stop(self, sig: int, timeout: float = 30) -> float:
        """Send `sig`, wait for the end; the seconds it took."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout} s after signal {sig}")
        seconds = time.monotonic() - sent
        for reader in self.readers:
            reader.join(timeout=5)
        return seconds


def big_paradigm(folder, pairs, copies: int):
    """One paradigm file holding every pair of `pairs` (the session's) `copies` times: minutes of scoring."""
    rows = [line for path in sorted(pairs.glob("*.jsonl")) for line in path.read_text().splitlines()]
    folder.mkdir()
    (folder / "many.jsonl").write_text("\n".join(rows * copies) + "\n")
    return folder


def units_file(path, ckpt):
    model, _, _ = load_model(ckpt)
    return write_units(path, ckpt, t_localizer=np.random.default_rng(0).normal(size=(len(model.site_names),
                                                                                    model.config.n_embed)))


def command_line(command, gpt2_run, tmp_path) -> tuple[list[str], str, list]:
    """(arguments of a run of `command` that takes minutes, a text it prints once the work is under way,
    the outputs it would write)."""
    ckpt = f"ckpt={gpt2_run.ckpt}"
    out = tmp_path / "results" / f"{command}.json"
    if command == "sample":
        return [ckpt, "max_new_tokens=1000000", "num_samples=1"], "# samples from", []
    if command == "blimp":
        data = big_paradigm(tmp_path / "blimp", gpt2_run.pairs, 2000)
        return [ckpt, f"data_dir={data}", "batch_size=1", f"out={out}"], "BLiMP (", [out]
    if command == "ablate":
        units = units_file(tmp_path / "units.npz", gpt2_run.ckpt)
        return ([ckpt, f"units={units}", "k=2", f"data_dir={gpt2_run.pairs}", f"dataset={gpt2_run.data}",
                 "val_batches=20000", "val_batch_size=1", f"out={out}"], "ablating k=2", [out, out.with_suffix(".png")])
    figures = tmp_path / "results" / "figures"
    return ([ckpt, f"out={figures}", "permutations=99999", "null_shuffles=1000"], "held-out text", [figures])


@pytest.mark.parametrize("command,sig", [("sample", signal.SIGINT), ("sample", signal.SIGUSR1),
                                         ("blimp", signal.SIGTERM), ("ablate", signal.SIGINT),
                                         ("analyze", signal.SIGTERM)])
def test_a_stop_signal_ends_an_inference_command_at_once_with_one_line(gpt2_run, tmp_path, command, sig):
    args, started, outputs = command_line(command, gpt2_run, tmp_path)
    (tmp_path / "results").mkdir()
    run = Watched([PYTHON, f"{command}.py", *args])
    run.wait_for(started)
    time.sleep(0.3)  # inside the work
    seconds = run.stop(sig)
    err = run.text("err")
    name = signal.Signals(sig).name
    assert run.proc.returncode == 128 + sig and seconds < STOP_BOUND_S, (run.proc.returncode, seconds, err[-2000:])
    assert err.replace("\r", "\n").splitlines()[-1] == f"stopped by {name}; nothing written", err[-2000:]
    assert "Traceback" not in err
    assert list((tmp_path / "results").iterdir()) == []  # neither outputs nor their temporary files
    assert not any(p.exists() for p in outputs)


def test_a_stop_while_the_analysis_is_written_leaves_the_earlier_analysis_as_it_was(gpt2_run, tmp_path, monkeypatch):
    """The figures go to a staging folder and are moved into `out` at the end: a stop after some of
    them leaves every file of the earlier analysis (overwrite=true) unchanged, and nothing new."""
    out = tmp_path / "figures"
    (out / "sites").mkdir(parents=True)
    earlier = {"summary.json": b'{"earlier": true}\n', "units.npz": b"earlier", "localizer_maps.png": b"earlier"}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    drawn = []

    def save_then_stop(fig, path):
        drawn.append(path)
        if len(drawn) == 3:
            raise Stopped(signal.SIGTERM)
        return real_save(fig, path)
    real_save = analyze.save_figure
    monkeypatch.setattr(analyze, "save_figure", save_then_stop)
    ran = run_main(analyze, [f"ckpt={gpt2_run.ckpt}", f"out={out}", "overwrite=true", "permutations=9",
                             "null_shuffles=2"])
    assert ran.returncode == 143 and ran.stderr.strip().splitlines()[-1] == "stopped by SIGTERM; nothing written"
    assert len(drawn) == 3 and all(".staging.tmp" in str(p) for p in drawn)
    assert sorted(p.name for p in out.iterdir()) == sorted([*earlier, "sites"]) and not any((out / "sites").iterdir())
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


def test_a_stop_during_the_final_write_lets_it_finish_and_says_so(gpt2_run, tmp_path, monkeypatch):
    """blimp.py's results file is written whole even when the signal arrives while it is written; the
    line then says so (exit status still 128 + the signal)."""
    out = tmp_path / "blimp.json"

    def signalled_write(path, content):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here: inside `held` it only remembers the signal
        real_write(path, content)
    real_write = blimp.atomic_write
    monkeypatch.setattr(blimp, "atomic_write", signalled_write)
    ran = run_main(blimp, [f"ckpt={gpt2_run.ckpt}", f"data_dir={gpt2_run.pairs}", f"out={out}"])
    assert ran.returncode == 143, ran.stderr[-2000:]
    assert ran.stderr.strip().splitlines()[-1] == f"stopped by SIGTERM; {out} was written in full"
    assert json.loads(out.read_text())["overall"]["accuracy"] == 1.0


def test_a_stop_outside_held_raises_at_once():
    exit_on_stop()
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert str(stopped.value) == "stopped by SIGINT; nothing written" and stopped.value.exit_status == 130
