"""Config loading, the config keys that commands share, `help`, and errors; importable without torch.

Design decisions
- Configs are dataclasses turned into OmegaConf structured configs. A YAML preset is merged
  first, then `key=value` overrides; an unknown key or a wrong type is refused with one line
  naming the key. Checks that span several keys live in each dataclass's `__post_init__`,
  which runs when the merged config is turned back into the dataclass. Nothing is `exec`-ed.
- `python X.py help` (or `--help`, `-h`) prints every key of the command's config class: name,
  type, choices, default, the preset's value and the docstring under the field. Python keeps no
  field docstrings at run time, so they are read from the classes' source with `ast`, following
  the bases (the mixins below, model.py's `SheetShape`/`GPTConfig`). It runs inside
  `load_config`, which every command calls first, so nothing (model, data) is loaded before it.
- Every refusal of bad input is a `UserError`. `cli_main` turns it into one `error: ...` line
  on stderr and exit status 2, so a script never dies with a traceback for a user's mistake.
(Distributed setup: topolm/distributed.py; files: topolm/files.py; tokenizer: topolm/tokenizer.py.)
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import re
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal

from topolm.signals import Stopped


REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"
DATA_DIR = REPO / "data"
POSITIONS_DIR = REPO / "gpt2-positions"
RUNS_DIR = Path("out")  # train.py's default out_dir, relative to the current folder
RUN_CHECKPOINT_RE = re.compile(r"^ckpt-\d+\.pt$")  # topolm.checkpoint.checkpoint_path's names


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def cli_main(main: Callable[[list[str]], Any]) -> None:
    """Run a script's `main(argv)`, turning a `UserError` into one line and exit status 2, and a stop signal
    of a command that exits on one (`topolm.signals.Stopped`) into one line and exit status 128 + its number."""
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
    except Stopped as e:  # a stop signal in a command that called topolm.signals.exit_on_stop
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_status)


# ----------------------------------------------------------------------------- config

def resolve_path(name: str, folder: Path, suffix: str = "") -> Path:
    """A bare name is looked up in `folder` (with `suffix` added if missing); a path is used as is."""
    if os.sep in name or "/" in name or name.startswith("."):
        return Path(name)
    candidate = folder / name
    if suffix and not candidate.exists() and not name.endswith(suffix):
        candidate = folder / (name + suffix)
    return candidate


def _omegaconf_message(e: Exception, cls: type) -> str:
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    key = getattr(e, "full_key", None)
    if type(e).__name__ == "ConfigKeyError" and key:
        import difflib

        close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown config key '{key}'; {hint}`python {Path(sys.argv[0]).name} help` lists every key"
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
    An argument `help`, `--help` or `-h` prints every key (`config_help`) and exits with status 0
    before anything else is read.
    """
    if any(a in HELP_ARGS for a in argv):
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                print(config_help(cls, argv, default_file), flush=True)
            except BrokenPipeError:  # `help | head`: the reader has seen enough; not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
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
        raise UserError(_omegaconf_message(e, cls)) from e
    except ValueError as e:  # raised by a dataclass's __post_init__
        raise UserError(str(e)) from e


def command_line_keys(argv: list[str]) -> set[str]:
    """The keys that `argv` sets as key=value overrides (not those its preset sets): what a user gave on
    the command line, as opposed to the preset's or the class's defaults."""
    return {a.split("=", 1)[0] for a in argv if "=" in a}


# ----------------------------------------------------------------------------- help

HELP_ARGS = ("help", "--help", "-h")


def _class_node(klass: type) -> ast.ClassDef | None:
    """The `class` statement of `klass` in its source file (None where the source is not at hand)."""
    try:
        path = inspect.getsourcefile(klass)
    except TypeError:  # a class defined in C or in an interactive session
        return None
    if not path or not os.path.isfile(path):
        return None
    tree = _parsed_source(path)
    names = klass.__qualname__.split(".")
    nodes: list = tree.body
    found = None
    for name in names:  # follows nesting, so two classes of one name in one file are told apart
        found = next((n for n in nodes if isinstance(n, ast.ClassDef) and n.name == name), None)
        if found is None:
            return None
        nodes = found.body
    return found


@functools.lru_cache(maxsize=None)
def _parsed_source(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def declared_fields(klass: type) -> dict[str, str]:
    """The fields that `klass`'s own body declares, in source order, each with its docstring ('' if none).

    Python keeps no attribute docstrings at run time, so they are read from the source with `ast`:
    the string literal that directly follows an annotated assignment `name: type = default`.
    """
    node = _class_node(klass)
    if node is None:
        return {}
    out: dict[str, str] = {}
    for stmt, after in zip(node.body, [*node.body[1:], None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = ""
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                doc = " ".join(inspect.cleandoc(after.value.value).split())
            out[stmt.target.id] = doc
    return out


@dataclass
class KeyHelp:
    """One config key as `help` shows it."""
    name: str
    type: str
    choices: tuple
    default: Any
    doc: str
    owner: type


def key_help(cls: type) -> list[KeyHelp]:
    """Every field of the dataclass `cls`, with its type, choices, default and docstring.

    A field belongs to the most derived class in `cls.__mro__` that declares it (a script that
    redeclares a shared key to change its default owns it); its docstring is the owner's, else the
    nearest base's that has one. Raises TypeError if `cls` is not a dataclass.
    """
    declared = [(k, declared_fields(k)) for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that names something the module does not import: show its text
        hints = {}
    out = []
    for f in dataclasses.fields(cls):
        owner = next((k for k, names in declared if f.name in names), cls)
        doc = next((names[f.name] for k, names in declared if names.get(f.name)), "")
        hint = hints.get(f.name, f.type)
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        if choices:
            type_name = type(choices[0]).__name__
        else:
            type_name = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(KeyHelp(f.name, type_name, choices, default, doc, owner))
    return out


def _preset_values(argv: list[str], default_file: str | None) -> tuple[str, dict]:
    """The preset `load_config` would read for `argv`, and its key: value pairs ({} if unreadable)."""
    from omegaconf import OmegaConf

    files = [a for a in argv if "=" not in a and a not in HELP_ARGS]
    name = files[0] if files else default_file
    if not name:
        return "", {}
    path = resolve_path(name, CONFIG_DIR, ".yaml")
    try:  # read as load_config reads it, so that '3e-3' shows as the float it becomes
        values = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # a missing or broken preset is load_config's to report; help still helps
        return f"{name} (not readable)", {}
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    return str(shown), values if isinstance(values, dict) else {}


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    return repr(value) if isinstance(value, str) else str(value)


def config_help(cls: type, argv: list[str], default_file: str | None = None) -> str:
    """The text `python X.py help` prints: the usage line, then every key of `cls` grouped by the
    class that declares it (name, type, choices, default, the preset's value where it sets one, and
    the docstring). Reads the config classes' source files and the preset; loads no model or data."""
    module = sys.modules.get(cls.__module__)
    script = Path(getattr(module, "__file__", "") or cls.__module__).name
    preset, values = _preset_values(argv, default_file)
    lines = [f"usage: python {script} [PRESET] [key=value ...]",
             "  PRESET: a YAML file of key: value lines (a bare name is looked up in config/); "
             "key=value overrides it.",
             f"  preset: {preset}; a key it sets shows its value there as [preset: value]" if preset
             else "  preset: none by default"]
    keys = key_help(cls)
    owners = {k.owner for k in keys}
    for owner in [k for k in cls.__mro__ if k in owners]:  # the command's own keys first, then its bases
        source = inspect.getsourcefile(owner) or ""
        where = Path(source).relative_to(REPO) if Path(source).resolve().is_relative_to(REPO) else Path(source).name
        node = _class_node(owner)  # not owner.__doc__: a dataclass without a docstring gets its signature there
        summary = " ".join(((node and ast.get_docstring(node)) or "").split("\n\n")[0].split())
        lines += ["", textwrap.fill(f"{owner.__name__} ({where})" + (f": {summary}" if summary else ""), width=100,
                                    subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)]
        own = declared_fields(owner)
        for k in sorted((k for k in keys if k.owner is owner), key=lambda k: list(own).index(k.name)
                        if k.name in own else len(own)):
            kind = f"{k.type}, one of {', '.join(map(str, k.choices))}" if k.choices else k.type
            line = f"  {k.name} ({kind}) = {_show(k.default)}"
            if k.name in values:
                line += f"  [preset: {_show(values[k.name])}]"
            lines.append(line)
            if k.doc:
                lines.append(textwrap.fill(k.doc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                           break_on_hyphens=False, break_long_words=False))
    return "\n".join(lines)


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


def run_suggestions(root: Path = RUNS_DIR, n: int = 3) -> str:
    """What to pass as ckpt=: the newest `n` run folders under `root` that hold a checkpoint (newest
    checkpoint file first), as ready-to-paste `ckpt=out/<run>`, or how to make one when there is none."""
    runs = []
    for folder in (root.iterdir() if root.is_dir() else ()):
        times = [p.stat().st_mtime for p in folder.glob("ckpt-*.pt") if RUN_CHECKPOINT_RE.match(p.name)] \
            if folder.is_dir() else []
        if times:
            runs.append((max(times), folder))
    if not runs:
        return (f"no run folder in {root}/ holds a checkpoint yet: train one (python train.py train_shakespeare.yaml, "
                f"or make demo) or pass the path of one")
    newest = [folder for _, folder in sorted(runs, key=lambda r: (r[0], r[1].name), reverse=True)[:n]]
    return f"newest runs with a checkpoint in {root}/: " + ", ".join(f"ckpt={folder}" for folder in newest)


@dataclass
class CheckpointKey(Checked):
    """The model of every command that loads a checkpoint."""
    ckpt: str = ""
    """Checkpoint file, or run folder whose newest checkpoint is used (a finetune.py task folder: its
    ckpt-best.pt)."""

    ckpt_required: ClassVar[bool] = True  # False where the checkpoint is optional (init_pos.py)

    def __post_init__(self):
        super().__post_init__()
        if self.ckpt_required and not self.ckpt:
            raise ValueError(f"ckpt= is required: a checkpoint file or run folder; {run_suggestions()}")


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


