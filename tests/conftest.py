import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = sys.executable

# Every command a user runs from the repository root; a change that adds one extends this list.
COMMANDS = {"train", "finetune", "sample", "analyze", "blimp", "ablate", "export_hf", "import_research", "init_pos",
            "bench", "gpu_check", "glue_summary"}


def write_pattern_data(folder: Path, vocab: int = 64, n_train: int = 40_000, n_val: int = 4_000, seed: int = 0) -> Path:
    """A learnable token stream: short repeated phrases, so a tiny model's loss falls within a few steps."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, size=rng.integers(3, 8)) for _ in range(12)]
    def stream(n):
        out = []
        while len(out) < n:
            out.extend(phrases[rng.integers(len(phrases))].tolist())
        return np.array(out[:n], dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    stream(n_train).tofile(folder / "train.bin")
    stream(n_val).tofile(folder / "val.bin")
    return folder


def numpy_spatial_loss(acts: np.ndarray, coords: np.ndarray) -> float:
    """The spatial loss written from its formula, 0.5 * (1 - Pearson(r, 1 / (1 + d))): acts (N, m), coords (m, 2) of those m units."""
    r = np.corrcoef(acts, rowvar=False)
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    D = 1.0 / (1.0 + d)
    i, j = np.tril_indices(len(coords), k=-1)
    return 0.5 * (1.0 - np.corrcoef(r[i, j], D[i, j])[0, 1])


TINY = dict(n_layer=2, n_head=2, n_embed=36, block_size=32, batch_size=4, vocab_size=64, radius=2,
            neighborhoods_per_batch=3, alpha=1.0, dropout=0.0, eval_iters=2, eval_interval=10, log_interval=1,
            save_interval=10, learning_rate=3e-3, warmup_iters=2, lr_decay_iters=40, min_lr=3e-4, max_iters=20,
            device="cpu", dtype="float32", compile=False, position_dir="''",
            output_vocab="full")  # the paper's full softmax, whatever the demo preset chooses


def overrides(**kw) -> list[str]:
    merged = {**TINY, **kw}
    return [f"{k}={v}" for k, v in merged.items()]


def run_script(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def one_error_line(proc, *fragments):
    """The script was refused the documented way: exit 2, one `error:` line, no traceback."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def torchrun_launcher(nproc: int) -> list[str]:
    """torchrun on this machine with `nproc` ranks; the script and its arguments follow."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def torchrun(nproc: int, script: str, args: list[str]) -> list[str]:
    """The command line of `script` under torchrun with `nproc` ranks (backend=gloo on CPU)."""
    return [*torchrun_launcher(nproc), script, *args]


def read_checkpoint(path: Path) -> dict:
    """A checkpoint through the project's single loader (format checked, older formats migrated)."""
    from topolm.checkpoint import load_checkpoint

    return load_checkpoint(path)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_pattern_data(tmp_path / "data")


def start_and_wait_for_log(args: list[str], log_path: Path, text: str, timeout: float = 120) -> subprocess.Popen:
    """Start a script in the background and return once its log.jsonl contains `text`."""
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not (log_path.exists() and text in log_path.read_text()):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{log_path} never showed {text!r}:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.02)
    return proc
