import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# One thread per process: `make test` runs one pytest worker per core (pytest-xdist), and every
# subprocess a test starts gets OMP_NUM_THREADS=1 too, so no core is shared by two thread pools.
# Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PYTHON = sys.executable

# Every command a user runs from the repository root; a change that adds one extends this list.
COMMANDS = {"train", "finetune", "sample", "analyze", "blimp", "ablate", "export_hf", "import_research", "init_pos",
            "bench", "gpu_check", "glue_summary", "development", "reproduce", "sweep"}


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


class Ran(NamedTuple):
    """What a command did: its exit status and what it printed (the fields of subprocess.CompletedProcess)."""
    returncode: int
    stdout: str
    stderr: str


def run_main(module, argv: list[str]) -> Ran:
    """`python <module>.py argv`, run in this process: the command's `main` through `cli_main` (which turns
    a UserError into one `error:` line and exit status 2), with sys.argv as the interpreter would set it."""
    from topolm.config import cli_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_argv = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main(module.main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return Ran(code, out.getvalue(), err.getvalue())


def command_module(script: str):
    """The module of a command (`train.py`) or a preparer (`data/fineweb/prepare.py`), imported once."""
    import importlib
    import importlib.util

    if "/" not in script:
        return importlib.import_module(script.removesuffix(".py"))
    name = "command_" + script.removesuffix(".py").replace("/", "_").replace("-", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_in_process(args: list[str], check: bool = True) -> Ran:
    """`args` as run_script takes them (`[PYTHON, "train.py", *argv]`), run in this process by run_main:
    the same `main` and `cli_main` as the command line, without starting an interpreter and torch again.
    Subprocesses stay for what a process boundary tests: signals, kills, torchrun, the real exit status."""
    assert args[0] == PYTHON and args[1].endswith(".py"), args
    ran = run_main(command_module(args[1]), [str(a) for a in args[2:]])
    if check and ran.returncode != 0:
        raise AssertionError(f"{args} failed ({ran.returncode}):\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
    return ran


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


# ----------------------------------------------------------------------------- process state


@contextlib.contextmanager
def process_state_restored():
    """Put back what an in-process run of a command may change for the whole process: the SIGTERM, SIGINT
    and SIGUSR1 handlers (every command that honours a stop installs its own) and torch's default dtype."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    torch = sys.modules.get("torch")  # not imported yet: nothing of it to restore
    dtype = torch.get_default_dtype() if torch else None
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if torch is not None:
            torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _restore_process_state():
    with process_state_restored():
        yield


# ----------------------------------------------------------------------------- the session's GPT-2 model

NOUNS = {"dog": "dogs", "cat": "cats"}
VERBS = {"runs": "run", "sleeps": "sleep"}
UNSEEN = {"runs": "flies", "sleeps": "swims", "run": "fly", "sleep": "swim"}


def grammar_corpus(folder: Path, seed: int = 0, n_train: int = 20_000, n_val: int = 2_000) -> Path:
    """GPT-2 token ids of 'The dog runs.' / 'The dogs run.' ...: one sentence per document, each followed
    by <|endoftext|> (train.bin and val.bin, uint16)."""
    from topolm.tokenizer import EOT_TOKEN, gpt2_encoding

    rng = np.random.default_rng(seed)
    enc = gpt2_encoding()

    def stream(n):
        out = []
        while len(out) < n:
            noun, verb = str(rng.choice(list(NOUNS))), str(rng.choice(list(VERBS)))
            if rng.random() < 0.5:
                noun, verb = NOUNS[noun], VERBS[verb]
            out += enc.encode_ordinary(f"The {noun} {verb}.") + [EOT_TOKEN]
        return np.array(out[:n], dtype=np.uint16)
    folder.mkdir(parents=True)
    stream(n_train).tofile(folder / "train.bin")
    stream(n_val).tofile(folder / "val.bin")
    return folder


def write_pairs(folder: Path) -> Path:
    """BLiMP-format minimal pairs whose answer is obvious after a few steps on the grammar corpus: a verb
    never seen vs a seen one (known_verb), and a word order never seen vs the corpus's (word_order); 8 each."""
    folder.mkdir(parents=True)
    known, order = [], []
    for noun, verb in itertools.product(list(NOUNS) + list(NOUNS.values()), VERBS):
        if noun in NOUNS.values():
            verb = VERBS[verb]
        known.append({"sentence_good": f"The {noun} {verb}.", "sentence_bad": f"The {noun} {UNSEEN[verb]}.",
                      "UID": "known_verb", "linguistics_term": "lexicon", "field": "semantics"})
        order.append({"sentence_good": f"The {noun} {verb}.", "sentence_bad": f"{noun.capitalize()} the {verb}.",
                      "UID": "word_order", "linguistics_term": "word_order", "field": "syntax"})
    for name, rows in (("known_verb", known), ("word_order", order)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# GPT-2's vocabulary and the full softmax (TINY's output_vocab); a block long enough for the longest
# analysis stimulus; a learning rate that learns the grammar corpus in 12 steps
GPT2_TINY = dict(vocab_size=50304, block_size=64, batch_size=4, learning_rate=1e-2, max_iters=12, warmup_iters=2,
                 lr_decay_iters=12, min_lr=1e-3, eval_interval=12, save_interval=12, eval_iters=1)


class Gpt2Run(NamedTuple):
    """The session's tiny trained model: its run folder, its one checkpoint, the corpus and the pairs."""
    run: Path
    ckpt: Path
    data: Path
    pairs: Path
    iters: int


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory) -> Gpt2Run:
    """A tiny TopoLM with GPT-2's vocabulary and the full softmax, trained once per session by train.py
    (in this process) on the grammar corpus: 2 layers, 6x6 sheets, block_size 64, 12 steps. Tests read it
    and write elsewhere; a test that needs a changed model copies it."""
    import train

    root = tmp_path_factory.mktemp("gpt2")
    data = grammar_corpus(root / "data")
    with process_state_restored():
        train.main(["train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(root), run_name="run",
                                                         **GPT2_TINY)])
    iters = GPT2_TINY["max_iters"]
    return Gpt2Run(root / "run", root / "run" / f"ckpt-{iters:07d}.pt", data, write_pairs(root / "blimp"), iters)


def write_units(path, run, **arrays):
    """A units file as analyze.py writes one for the checkpoint of `run`: the arrays given, the model's sites
    and positions, and the model's provenance."""
    from topolm.checkpoint import load_model
    from topolm.provenance import provenance

    model, ckpt, ckpt_path = load_model(run)
    np.savez(path, site_names=np.array(model.site_names), coords=model.sheet.unit_coords.numpy(),
             provenance=np.array(json.dumps(provenance(ckpt_path, ckpt, model))), **arrays)
    return path


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


# A stop is honoured within 5 s on an idle 2-core machine (one optimizer step or one evaluation batch,
# then the save and the interpreter's exit). The tests allow STOP_BOUND_S so that a machine shared with
# other jobs does not fail them; what they guard against took minutes (an evaluation of 10**7 batches
# run to its end, or a run killed by SIGUSR1).
STOP_BOUND_S = 15


class StopAtOnce:
    """topolm.signals.StopFlag as if SIGTERM had arrived before the command started (monkeypatched into
    train.py or finetune.py)."""
    requested = True

    def restore(self):
        pass


def signal_and_wait(proc: subprocess.Popen, sig: int, pid: int | None = None,
                    timeout: float = 60) -> tuple[float, str, str]:
    """Send `sig` to `pid` (default: `proc` itself) and wait for `proc` to end: (seconds from the signal
    to its end, stdout, stderr). A process still running after `timeout` seconds is killed and fails the test."""
    import time

    sent = time.monotonic()
    os.kill(pid or proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running {timeout} s after signal {sig}:\n{out[-2000:]}\n{err[-2000:]}")
    return time.monotonic() - sent, out, err


# ----------------------------------------------------------------------------- order


def pytest_collection_modifyitems(session, config, items):
    """Modules holding compile or torchrun tests (the longest) run first, each kept whole so that its
    module-scoped fixtures are built once: with one worker per core, no long test is left running
    alone at the end."""
    slow = {item.module for item in items
            if item.get_closest_marker("compile") or item.get_closest_marker("torchrun")}
    items.sort(key=lambda item: item.module not in slow)


def random_hf_gpt2(folder: Path, n_embd: int):
    """A randomly initialised transformers GPT2LMHeadModel (GPT-2's own gelu_new, GPT-2's 50257 ids, 2 layers of
    width n_embd) with random biases and larger MLP inputs, saved with save_pretrained into `folder`: a foreign
    GPT-2 folder, made without a download. Returns (folder, the model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2,
                                    activation_function="gelu_new")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("mlp.c_fc.weight"):  # GELU inputs of order 1, where tanh and erf differ by ~1e-3
                p.normal_(0.0, 0.3)
    hf.save_pretrained(str(folder))
    return folder, hf
