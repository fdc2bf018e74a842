"""train.py end to end: loss falls, checkpoints, resume (bit-exact after a kill), DDP over gloo."""
import pytest
import os
import shutil
import signal
import subprocess
import time

import torch

from conftest import (STOP_BOUND_S, PYTHON, REPO, overrides, read_checkpoint, read_log, run_in_process, run_script,
                      signal_and_wait, start_and_wait_for_log, torchrun, torchrun_launcher)


def train_args(data, out, **kw):
    return [PYTHON, "train.py", "train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(out), **kw)]


def final_weights(run_dir, it):
    return read_checkpoint(run_dir / f"ckpt-{it:07d}.pt")


def last_per_iter(log, event="train"):
    return {r["iter"]: r for r in log if r["event"] == event}


def test_short_run_lowers_loss_writes_checkpoint_and_resumes(tiny_data, tmp_path):
    run_in_process(train_args(tiny_data, tmp_path, run_name="r", max_iters=20))
    run_dir = tmp_path / "r"
    log = read_log(run_dir)
    evals = [r for r in log if r["event"] == "eval"]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 20
    assert evals[-1]["val"]["task"] < evals[0]["val"]["task"] - 0.5
    assert evals[-1]["val"]["spatial"] < evals[0]["val"]["spatial"]
    ckpt = final_weights(run_dir, 20)  # weights_only=True: no pickled classes inside
    assert ckpt["iter_num"] == 20 and "sheet.unit_coords" in ckpt["model"]
    assert not any(k.startswith("_orig_mod.") or k.startswith("module.") for k in ckpt["model"])
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000010.pt", "ckpt-0000020.pt"]
    assert not list(run_dir.glob("*.tmp*"))

    run_in_process(train_args(tiny_data, tmp_path, run_name="r", max_iters=30, init_from="resume"))
    log2 = read_log(run_dir)
    assert log2[:len(log)] == log  # appended, not truncated
    assert [r["event"] for r in log2[len(log):]][0] == "resume"
    trained = sorted(last_per_iter(log2[len(log):]))
    assert trained == list(range(20, 30))
    assert final_weights(run_dir, 30)["iter_num"] == 30


def test_positions_from_a_set_travel_into_the_checkpoint(tiny_data, tmp_path):
    run_in_process([PYTHON, "init_pos.py", "layout=random", "n_layer=2", "n_embed=36", "seed=5", f"out={tmp_path / 'pos'}"])
    run_in_process(train_args(tiny_data, tmp_path, run_name="p", max_iters=2, position_dir=str(tmp_path / "pos")))
    import numpy as np
    saved = np.load(tmp_path / "pos" / "positions.npy")
    ckpt = final_weights(tmp_path / "p", 2)
    assert np.array_equal(ckpt["model"]["sheet.unit_coords"].numpy(), saved)


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill_tree(pid):
    """SIGKILL a launcher and every process under it (torchrun puts workers in sessions of their own)."""
    for p in _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_when(proc, log_path, min_iter, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed")
        if log_path.exists():
            iters = [int(line.split('"iter": ')[1].split(",")[0]) for line in log_path.read_text().splitlines()
                     if '"event": "train"' in line]
            if iters and iters[-1] >= min_iter:
                _kill_tree(proc.pid)
                proc.wait()
                time.sleep(0.5)  # let orphaned workers' deaths settle before the restart
                return iters[-1]
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the run")


def _exact_resume(tiny_data, tmp_path, launcher, extra):
    common = dict(max_iters=40, save_interval=10, eval_interval=20, dropout=0.1, **extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run_script([*launcher, *train_args(tiny_data, tmp_path, run_name="whole", **common)[1:]])
    proc = subprocess.Popen([*launcher, *train_args(tiny_data, tmp_path, run_name="killed", **common)[1:]],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_when(proc, tmp_path / "killed" / "log.jsonl", min_iter=12)
    assert killed_at < 39
    newest = max(int(p.stem.split("-")[1]) for p in (tmp_path / "killed").glob("ckpt-*.pt"))
    run_script([*launcher, *train_args(tiny_data, tmp_path, run_name="killed", init_from="resume", **common)[1:]])
    whole, resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "killed")
    assert [r for r in resumed if r["event"] == "resume"][0]["iter"] == newest  # newest complete checkpoint
    assert 10 <= newest < 40
    a, b = last_per_iter(whole), last_per_iter(resumed)
    assert sorted(a) == sorted(b) == list(range(40))
    for it in range(40):
        assert (a[it]["loss"], a[it]["task"], a[it]["spatial"]) == (b[it]["loss"], b[it]["task"], b[it]["spatial"]), it
    wa, wb = final_weights(tmp_path / "whole", 40)["model"], final_weights(tmp_path / "killed", 40)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_after_sigkill(tiny_data, tmp_path):
    _exact_resume(tiny_data, tmp_path, [PYTHON], {})


@pytest.mark.torchrun
def test_exact_resume_after_sigkill_ddp(tiny_data, tmp_path):
    launcher = torchrun_launcher(2)
    _exact_resume(tiny_data, tmp_path, launcher, dict(backend="gloo", gradient_accumulation_steps=2))


@pytest.mark.torchrun
def test_ddp_two_ranks_train_and_agree(tiny_data, tmp_path):
    proc = run_script(torchrun(2, "train.py", ["train_shakespeare.yaml", *overrides(dataset=str(tiny_data), out_dir=str(tmp_path), run_name="d",
                                                            max_iters=20, backend="gloo", gradient_accumulation_steps=4)]))
    log = read_log(tmp_path / "d")
    assert log[0]["world_size"] == 2
    end = [r for r in log if r["event"] == "end"][0]
    assert len(end["param_sha256"]) == 2 and len(set(end["param_sha256"])) == 1
    evals = [r for r in log if r["event"] == "eval"]
    assert evals[-1]["val"]["task"] < evals[0]["val"]["task"] - 0.5
    assert "tokens per iteration: 512 (2 micro-steps x 2 ranks x 4 x 32)" in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_and_exits_cleanly(tiny_data, tmp_path, sig):
    """SIGUSR1 (SLURM sites' usual pre-emption warning) stops a run as SIGTERM does, within seconds."""
    proc = start_and_wait_for_log(train_args(tiny_data, tmp_path, run_name="t", max_iters=100000, save_interval=100000),
                                  tmp_path / "t" / "log.jsonl", '"event": "train"')
    seconds, out, err = signal_and_wait(proc, sig)
    assert proc.returncode == 0 and seconds < STOP_BOUND_S, (proc.returncode, seconds, err[-2000:])
    stopped = [r for r in read_log(tmp_path / "t") if r["event"] == "stopped"]
    assert stopped and (tmp_path / "t" / f"ckpt-{stopped[0]['iter']:07d}.pt").is_file()


def test_a_stop_during_an_evaluation_abandons_it_saves_the_last_step_and_resumes_exactly(tiny_data, tmp_path):
    """SIGTERM in an evaluation of 10 million batches: the run leaves it within seconds, logs no partial
    evaluation, saves the state after its last completed step (5) and exits 0; resumed, it evaluates at
    step 5 again and trains on as an uninterrupted run does, bit for bit. (The evaluation's length is
    eval_iters, which touches no training stream: the resumed run evaluates with the whole run's 2.)"""
    common = dict(max_iters=12, save_interval=3, eval_interval=5, dropout=0.1)
    run_script(train_args(tiny_data, tmp_path, run_name="whole", **common))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "whole" / "ckpt-0000003.pt", cut)  # resumed at 3: the next evaluation is at 5
    proc = start_and_wait_for_log(train_args(tiny_data, tmp_path, run_name="cut", init_from="resume",
                                             **{**common, "eval_iters": 10**7}), cut / "log.jsonl", '"iter": 4,')
    seconds, out, err = signal_and_wait(proc, signal.SIGTERM)
    assert proc.returncode == 0 and seconds < STOP_BOUND_S, (proc.returncode, seconds, err[-2000:])
    assert "stop requested during the evaluation at iteration 5: evaluation abandoned" in out
    log = read_log(cut)
    assert [(r["event"], r["iter"]) for r in log] == [("resume", 3), ("train", 3), ("train", 4), ("stopped", 5)]
    assert sorted(p.name for p in cut.glob("ckpt-*.pt")) == ["ckpt-0000003.pt", "ckpt-0000005.pt"]

    run_script(train_args(tiny_data, tmp_path, run_name="cut", init_from="resume", **common))
    log = read_log(cut)
    assert [(r["event"], r["iter"]) for r in log[4:6]] == [("resume", 5), ("eval", 5)]
    a, b = last_per_iter(read_log(tmp_path / "whole")), last_per_iter(log)
    assert sorted(b) == list(range(3, 12))
    for it in range(3, 12):
        assert (a[it]["loss"], a[it]["task"], a[it]["spatial"]) == (b[it]["loss"], b[it]["task"], b[it]["spatial"]), it
    evals = {r["iter"]: r["val"] for r in read_log(tmp_path / "whole") if r["event"] == "eval"}
    assert {r["iter"]: r["val"] for r in log if r["event"] == "eval"} == {k: evals[k] for k in (5, 10, 12)}
    wa, wb = final_weights(tmp_path / "whole", 12)["model"], final_weights(cut, 12)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_keep_last_prunes_old_checkpoints_and_ignores_partial_files(tiny_data, tmp_path):
    run_dir = tmp_path / "k"
    run_dir.mkdir()
    (run_dir / "ckpt-0000099.pt.tmp123").write_bytes(b"partial")  # a save that was killed midway
    run_in_process(train_args(tiny_data, tmp_path, run_name="k", max_iters=6, save_interval=2, keep_last=2))
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000004.pt", "ckpt-0000006.pt"]
    run_in_process(train_args(tiny_data, tmp_path, run_name="k", max_iters=8, save_interval=2, keep_last=2,
                          init_from="resume"))
    resumed = [r for r in read_log(run_dir) if r["event"] == "resume"]
    assert resumed[0]["iter"] == 6


@pytest.mark.torchrun
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_and_resumes_exactly(tiny_data, tmp_path):
    """Schedulers signal the launcher: torchrun passes SIGTERM on to its workers, whose stop flags are
    all-reduced, so both ranks stop after the same step and the checkpoint resumes bit-exactly."""
    launcher = torchrun_launcher(2)
    common = dict(max_iters=60, save_interval=1000, eval_interval=1000, dropout=0.1, backend="gloo",
                  gradient_accumulation_steps=2)
    run_script([*launcher, *train_args(tiny_data, tmp_path, run_name="whole", **common)[1:]])
    proc = start_and_wait_for_log([*launcher, *train_args(tiny_data, tmp_path, run_name="t", **common)[1:]],
                                  tmp_path / "t" / "log.jsonl", '"iter": 3,')
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stopped = [r for r in read_log(tmp_path / "t") if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["iter"] < 60
    assert (tmp_path / "t" / f"ckpt-{stopped[0]['iter']:07d}.pt").is_file()
    run_script([*launcher, *train_args(tiny_data, tmp_path, run_name="t", init_from="resume", **common)[1:]])
    end = [r for r in read_log(tmp_path / "t") if r["event"] == "end"][0]
    assert len(set(end["param_sha256"])) == 1
    wa, wb = final_weights(tmp_path / "whole", 60)["model"], final_weights(tmp_path / "t", 60)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (from its environment)."""
    for pid in _descendants(launcher_pid)[1:]:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.mark.torchrun
def test_usr1_to_one_worker_stops_every_rank_in_the_same_evaluation_batch(tiny_data, tmp_path):
    """torchrun does not pass SIGUSR1 on (it dies of it), so it goes to the workers; one is enough: the
    stop flag is all-reduced with every evaluation batch, both ranks leave the evaluation at the same
    batch (no rank waits in a collective), rank 0 saves and every process exits 0."""
    args = train_args(tiny_data, tmp_path, run_name="w", eval_iters=10**7, backend="gloo",
                      gradient_accumulation_steps=2)
    proc = start_and_wait_for_log([*torchrun_launcher(2), *args[1:]], tmp_path / "w" / "log.jsonl", '"event": "start"')
    seconds, out, err = signal_and_wait(proc, signal.SIGUSR1, pid=_worker_of_rank(proc.pid, 1))
    assert proc.returncode == 0 and seconds < STOP_BOUND_S, (proc.returncode, seconds, err[-3000:])
    assert "stop requested during the evaluation at iteration 0: evaluation abandoned" in out
    assert [(r["event"], r["iter"]) for r in read_log(tmp_path / "w")] == [("start", 0), ("stopped", 0)]
    assert (tmp_path / "w" / "ckpt-0000000.pt").is_file()


def test_output_vocab_corpus_records_the_corpus_ids_and_resumes(tiny_data, tmp_path):
    """output_vocab=corpus: the checkpoint's model holds exactly the ids of train.bin and val.bin, the
    loss falls, and a resume continues the same model."""
    import numpy as np
    used = np.union1d(np.fromfile(tiny_data / "train.bin", dtype=np.uint16),
                      np.fromfile(tiny_data / "val.bin", dtype=np.uint16))
    assert 10 < len(used) < 64  # the pattern data leave some ids of the 64 unused
    run_in_process(train_args(tiny_data, tmp_path, run_name="v", max_iters=20, output_vocab="corpus"))
    ckpt = final_weights(tmp_path / "v", 20)
    assert ckpt["model_config"]["n_output_ids"] == len(used)
    assert np.array_equal(ckpt["model"]["output_ids"].numpy(), used)
    evals = [r for r in read_log(tmp_path / "v") if r["event"] == "eval"]
    assert evals[0]["val"]["task"] < np.log(len(used)) + 0.1  # starts near uniform over the corpus ids
    assert evals[-1]["val"]["task"] < evals[0]["val"]["task"] - 0.3
    run_in_process(train_args(tiny_data, tmp_path, run_name="v", max_iters=22, output_vocab="corpus", init_from="resume"))
    assert np.array_equal(final_weights(tmp_path / "v", 22)["model"]["output_ids"].numpy(), used)
    proc = run_in_process(train_args(tiny_data, tmp_path, run_name="v", max_iters=24, init_from="resume"), check=False)
    assert proc.returncode == 2 and f"n_output_ids={len(used)} in checkpoint vs 0 now" in proc.stderr
