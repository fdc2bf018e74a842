"""The checkpoint format: the one place that writes, reads, migrates and builds models from checkpoints.

A checkpoint is a `torch.save`d dict of tensors and plain Python values, so it loads with
`torch.load(..., weights_only=True)`; no class of ours is ever pickled. It is written under a
temporary name and renamed into place (`topolm.files.atomic_write`), so a reader never sees a partial one.

Format `topolm-ckpt-v3` (the current one):

| key | what |
|---|---|
| `format` | `"topolm-ckpt-v3"` |
| `kind` | `"pretrain"` (train.py), `"finetune"` (finetune.py) or `"imported"` (converted from elsewhere) |
| `model` | the un-compiled, un-wrapped GPT's `state_dict`; the unit positions are its buffer `sheet.unit_coords` |
| `model_config` | `dataclasses.asdict(GPTConfig)` |
| `tokenizer` | `{"name": "gpt2", "n_vocab": 50257}` when token ids are GPT-2 BPE ids, else `None` (ids only: no text) |
| `layout` | `{"permutation": bool, "source": str}`: whether every site's coordinates are a permutation of the grid (the spatial loss needs one), and where they came from |
| `data` | the text the GPT was trained on, `{"dataset": str or None, "path": str or None, "tokenizer": str or None}`: the dataset key as given, the folder it resolved to (absolute), the tokenizer its token files name (`meta.json`; "gpt2" when it names none). A finetuned checkpoint carries its backbone's; an imported one the research config's dataset when that is a plain name (path and tokenizer None); `None` when unknown |
| `config` | the writing script's config (a dict) |
| `iter_num` | optimizer steps taken |
| `head`, `task`, `pretrained` | finetuned checkpoints only: the classifier head's `state_dict`, the task, the source checkpoint |
| `optimizer`, `scaler`, `rng`, `world_size` | the resume state (topolm.training.RunCheckpoints): AdamW's and the fp16 grad scaler's `state_dict`s (scaler None without fp16), every rank's random streams, the rank count; `rng` and `world_size` are in every checkpoint a run writes, the optimizer's only in those it resumes from |
| others | the writing loop's own state (`best_val_loss`, `wandb_id`; finetuning's `best`, `evals_since_best`) |

Older formats are migrated on load (`_MIGRATIONS`, one step at a time): `topolm-ckpt-v1` (train.py and
finetune.py of before the tokenizer and layout fields) gains `kind`, `tokenizer` and `layout`;
`topolm-ckpt-v2` gains `data` (a pretrained one: its config's dataset, path and tokenizer unknown; a
finetuned one: None, its backbone's is not in the file; an imported one: the research config's plain
dataset name). To grow the format, bump `FORMAT`, add the old tag with a migration function to the
next one, and every reader keeps working.
"""
from __future__ import annotations

import dataclasses
import re
import zipfile
from pathlib import Path

import torch

from topolm.tokenizer import EOT_TOKEN
from topolm.config import DATA_DIR, UserError, resolve_path, run_suggestions
from topolm.files import atomic_write
from topolm.provenance import weights_digest
from topolm.hf import hf_layout, is_hf_folder, read_hf_model
from model import GPT, GPTConfig, SequenceClassifier
from positions import NOT_A_PERMUTATION, is_permutation

FORMAT = "topolm-ckpt-v3"
GPT2_TOKENIZER = {"name": "gpt2", "n_vocab": EOT_TOKEN + 1}
KINDS = ("pretrain", "finetune", "imported")

# ----------------------------------------------------------------------------- files of a run

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(run_dir: Path, iter_num: int) -> Path:
    """`run_dir/ckpt-<iter, 7 digits>.pt`: the name train.py gives the checkpoint after `iter_num` steps."""
    return Path(run_dir) / f"ckpt-{iter_num:07d}.pt"


def checkpoint_iter(path: Path) -> int:
    """The iteration in a checkpoint file's name (`checkpoint_path`'s). Raises ValueError for another name."""
    m = CKPT_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named as a run's checkpoint (ckpt-<iter>.pt)")
    return int(m.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, the newest complete checkpoint of a run folder, or a finetuned folder's best.

    Raises UserError when there is none, naming the newest runs in out/ that hold one (run_suggestions)."""
    p = Path(path_or_run)
    if p.is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts and (p / "ckpt-best.pt").is_file():  # a finetune.py output folder
            return p / "ckpt-best.pt"
        if not ckpts:
            raise UserError(f"no checkpoint (ckpt-*.pt) in {p}; {run_suggestions()}")
        return ckpts[-1]
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}; {run_suggestions()}")
    return p


# ----------------------------------------------------------------------------- writing

def tokenizer_for(vocab_size: int, dataset_tokenizer: str | None = "gpt2") -> dict | None:
    """The `tokenizer` field for a model of `vocab_size` trained on ids of `dataset_tokenizer`.

    GPT-2 text needs every id up to 50256 (`<|endoftext|>`); a smaller model holds ids only."""
    if dataset_tokenizer == "gpt2" and vocab_size > EOT_TOKEN:
        return dict(GPT2_TOKENIZER)
    return None


def data_record(dataset: str | None, path: Path | str | None, tokenizer: str | None) -> dict:
    """The `data` field: the dataset key as given, the folder it resolved to (made absolute), and the
    tokenizer its token files name."""
    return {"dataset": dataset, "path": None if path is None else str(Path(path).resolve()), "tokenizer": tokenizer}


def recorded_val_bin(ckpt: dict, min_bytes: int = 1) -> Path | None:
    """The val.bin of the text a checkpoint records it was trained on (its `data` field): in the recorded folder,
    else in its dataset key resolved under data/ (the folder moved or another clone); the first of at least
    `min_bytes` bytes, None when there is none."""
    data = ckpt.get("data") or {}
    folders = [Path(data["path"])] if data.get("path") else []
    if data.get("dataset"):
        folders.append(resolve_path(str(data["dataset"]), DATA_DIR))
    for folder in folders:
        val = folder / "val.bin"
        if val.is_file() and val.stat().st_size >= min_bytes:
            return val
    return None


def make_payload(gpt: GPT, *, kind: str, config: dict, iter_num: int, tokenizer: dict | None,
                 layout_source: str, data: dict | None = None, **extra) -> dict:
    """The checkpoint dict for `gpt` (un-compiled and un-wrapped); `data` is the `data` field
    (`data_record`; None: the training text is unknown); `extra` holds the writer's own fields."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    coords = gpt.sheet.unit_coords.cpu().numpy()
    return {
        "format": FORMAT,
        "kind": kind,
        "model": gpt.state_dict(),
        "model_config": dataclasses.asdict(gpt.config),
        "tokenizer": tokenizer,
        "layout": {"permutation": bool(is_permutation(coords, gpt.config.n_embed, gpt.sheet.shape)),
                   "source": layout_source},
        "data": data,
        "config": config,
        "iter_num": iter_num,
        **extra,
    }


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write a checkpoint atomically (temporary name, fsync, rename)."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"payload format {payload.get('format')!r} is not {FORMAT}; build it with make_payload")
    atomic_write(path, lambda f: torch.save(payload, f))


# ----------------------------------------------------------------------------- reading

def _from_v1(ckpt: dict) -> dict:
    """v1 had no kind, tokenizer or layout: its models were trained on GPT-2 ids (or on ids only,
    below GPT-2's vocabulary) with permutation layouts written by init_pos.py or drawn at random."""
    mc = ckpt["model_config"]
    mc.setdefault("n_output_ids", 0)  # the restricted output softmax came later
    coords = ckpt["model"]["sheet.unit_coords"].numpy()
    ckpt["kind"] = "finetune" if "head" in ckpt else "pretrain"
    ckpt["tokenizer"] = tokenizer_for(mc["vocab_size"])
    ckpt["layout"] = {"permutation": bool(is_permutation(coords, mc["n_embed"])), "source": "topolm-ckpt-v1"}
    ckpt["format"] = "topolm-ckpt-v2"
    return ckpt


PLAIN_NAME = re.compile(r"[\w.\-/]+")


def plain_dataset(config: dict | None) -> str | None:
    """A config's `dataset` when it is a plain name or path (not a Python expression in text), else None."""
    value = (config or {}).get("dataset") if isinstance(config, dict) else None
    return value if isinstance(value, str) and PLAIN_NAME.fullmatch(value) else None


def _from_v2(ckpt: dict) -> dict:
    """v2 had no data field. A pretrained checkpoint's config names its dataset (resolved at the time
    of writing to a folder it no longer records); a finetuned one's config has none of its backbone."""
    if ckpt["kind"] == "pretrain" and (ckpt.get("config") or {}).get("dataset"):
        ckpt["data"] = data_record(str(ckpt["config"]["dataset"]), None, None)
    elif ckpt["kind"] == "imported" and plain_dataset((ckpt.get("research") or {}).get("config")):
        ckpt["data"] = data_record(plain_dataset(ckpt["research"]["config"]), None, None)
    else:
        ckpt["data"] = None
    ckpt["format"] = FORMAT
    return ckpt


_MIGRATIONS = {"topolm-ckpt-v1": _from_v1, "topolm-ckpt-v2": _from_v2}


# torch's own words for what is wrong with a file it cannot read, and ours (first match wins)
ZIP_MAGIC = b"PK\x03\x04"
# torch.save's format before torch 1.6: a protocol-2 pickle of torch's magic number (a 10-byte long)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
TRUNCATED = "the file is truncated (an interrupted copy, download or save?); copy it again"


def first_bytes(head: bytes) -> str:
    """The first bytes of a file in words: as text when they are printable ASCII, else in hex."""
    if head and all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return f"text {head.decode('ascii')!r}"
    return f"bytes {head[:8].hex(' ')}"


def file_problem(path: Path) -> str | None:
    """What is wrong with a file meant to be a `torch.save` file, from its bytes alone; None when it has
    the shape of one: a complete zip file holding one `<name>/data.pkl`, or torch's legacy format (which
    the caller may refuse)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if not head:
        return "it is empty (0 bytes), not a checkpoint"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return f"it is a zip file without its end: {TRUNCATED}"
        with zipfile.ZipFile(path) as z:
            if len([n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]) != 1:
                return "it is a zip file that torch.save did not write (no single <name>/data.pkl), not a checkpoint"
        return None
    if head == LEGACY_MAGIC:
        return None
    return (f"it is not a checkpoint: neither a torch.save zip file nor torch's legacy format (it begins with "
            f"{first_bytes(head)})")


def _truncated(_m) -> str:
    return f"it ends early: {TRUNCATED}"


_TORCH_LOAD_ERRORS = [
    (re.compile(r"unexpected EOF|pickle data was truncated|Ran out of input"), _truncated),
    (re.compile(r"resize storage that is not resizable|out of bounds for storage"),
     lambda m: "a tensor in it is larger than its storage (the file is damaged or was not written by torch.save)"),
    (re.compile(r"GLOBAL ([\w.]+)"), lambda m: refused_global(m.group(1))),
]
RESEARCH_MODULES = ("omegaconf", "positions")  # what only a research-code checkpoint pickles


def refused_global(name: str) -> str:
    """Why a pickled global `name` (module.qualname) is not loaded, in words."""
    return (f"it names {name}, which is not a tensor or a plain value; it is refused because unpickling it could "
            f"run code")


def torch_load_reason(error: Exception) -> str:
    """What is wrong with a file, in one line, from the exception `torch.load(..., weights_only=True)` raised.

    torch's own advice to load the file with weights_only=False (running its code) is never repeated."""
    text = str(error)
    if isinstance(error, EOFError):
        return _truncated(None)
    for pattern, reason in _TORCH_LOAD_ERRORS:
        if m := pattern.search(text):
            return reason(m)
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
             and not line.startswith(("Check the documentation", "Please file an issue"))]
    return lines[0].removeprefix("WeightsUnpickler error:").strip() if lines else type(error).__name__


def _research_hint(error: Exception, path: Path) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    if not (m and m.group(1).split(".")[0] in RESEARCH_MODULES):
        return ""
    return (f"; it is a checkpoint of the research code: convert it with import_research.py: "
            f"python import_research.py ckpt={path} positions=<its positions folder> out=<new checkpoint file>")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint of any supported format, migrated to the current one.

    Raises UserError for a missing file, a file torch cannot read safely, or a foreign/unknown format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = file_problem(path) or torch_load_reason(e)
        raise UserError(f"cannot load checkpoint {path}: {why}{_research_hint(e, path)}") from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (FORMAT, *_MIGRATIONS):
        known = ", ".join([FORMAT, *_MIGRATIONS])
        raise UserError(f"{path} is not a checkpoint of this code (format {fmt!r}; readable: {known})")
    _check_fields(ckpt, path, migrated=False)
    while fmt in _MIGRATIONS:  # one step at a time: v1 -> v2 -> v3
        ckpt = _MIGRATIONS[fmt](ckpt)
        fmt = ckpt["format"]
    _check_fields(ckpt, path, migrated=True)
    # written before the MLP's GELU was a choice: the exact GELU (a defaulted field, no format step)
    ckpt["model_config"].setdefault("activation", "gelu")
    return ckpt


def _check_fields(ckpt: dict, path: Path, migrated: bool) -> None:
    """Refuse a checkpoint whose fields are missing or not of their kind, naming the field; before
    migration only what every format has (`model`, `model_config`), after it the current format's."""
    fields = {"model": dict, "model_config": dict, "iter_num": int}
    if migrated:
        fields.update(kind=str, layout=dict, tokenizer=(dict, type(None)), config=dict)
    for key, kind in fields.items():
        if key not in ckpt:
            raise UserError(f"{path}: the checkpoint has no {key!r} field; it is damaged or not written by this code")
        if not isinstance(ckpt[key], kind):
            raise UserError(f"{path}: the checkpoint's {key!r} is a {type(ckpt[key]).__name__}; it is damaged")
    bad = next(((k, v) for k, v in ckpt["model"].items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))),
               None)
    if bad:
        raise UserError(f"{path}: the checkpoint's 'model' holds {bad[0]!r}: {type(bad[1]).__name__}, not a weight")
    if "sheet.unit_coords" not in ckpt["model"]:
        raise UserError(f"{path}: the checkpoint's 'model' has no sheet.unit_coords (the unit positions); it is damaged")
    if migrated:
        try:
            GPTConfig(**ckpt["model_config"])
        except TypeError as e:  # a key GPTConfig does not have, or lacks
            raise UserError(f"{path}: the checkpoint's model_config does not fit this code's GPTConfig ({e})") from e
        except ValueError as e:
            raise UserError(f"{path}: the checkpoint's model_config is no valid model: {e}") from e


# ----------------------------------------------------------------------------- models

def build_gpt(ckpt: dict, **config_overrides) -> GPT:
    """The GPT of a checkpoint (weights and unit positions), with `config_overrides` (e.g. dropout,
    alpha) applied to its GPTConfig. Returned on the CPU in training mode."""
    gpt = GPT(GPTConfig(**{**ckpt["model_config"], **config_overrides}))
    try:
        gpt.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch lists every mismatch over several lines
        problems = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
        raise UserError(f"the checkpoint's weights do not fit its model_config: {'; '.join(problems)[:600]}") from e
    return gpt


def build_classifier(ckpt: dict, n_outputs: int | None = None, head_dropout: float = 0.0,
                     **config_overrides) -> SequenceClassifier:
    """A sequence classifier: a finetuned checkpoint's own head, or a new head of `n_outputs` on a
    pretrained GPT. Raises UserError when neither is possible."""
    if "head" in ckpt:
        n_outputs = ckpt["task"]["n_outputs"]
    elif n_outputs is None:
        raise UserError("this checkpoint has no classifier head; finetune it first")
    model = SequenceClassifier(build_gpt(ckpt, **config_overrides), n_outputs, head_dropout)
    if "head" in ckpt:
        model.head.load_state_dict(ckpt["head"])
    return model


def hf_checkpoint(folder: str | Path) -> dict:
    """A Hugging Face GPT2LMHeadModel folder (an export, or any GPT-2 whose config.json fits model.py:
    topolm.hf.HF_REQUIREMENTS) as a checkpoint dict: its weights transposed back,
    its unit positions from positions.npy (else the identity layout), its spatial settings and
    tokenizer from topolm.json (else alpha 0, and GPT-2's tokenizer for a vocabulary of at least 50257).
    An export whose topolm.json provenance records these very weights (its digest) keeps the source
    checkpoint's kind, step (`iter_num`) and `data`; any other folder is kind "imported" at step 0.

    Its extra field `hf` is `{"folder": str, "positions": bool}` (whether the folder had positions).
    Raises UserError naming the config.json key or the file that does not fit."""
    folder = Path(folder)
    model_config, state, coords, sheet = read_hf_model(folder)
    tokenizer = sheet["tokenizer"] if "tokenizer" in sheet else tokenizer_for(model_config.vocab_size)
    provenance = sheet.get("provenance") or {}
    # An export of this project's checkpoint records the checkpoint's kind and step: results derived from the
    # folder then carry the same provenance as those derived from the checkpoint (but for the path).
    exported = provenance.get("weights_sha256") == weights_digest(state)
    kind = provenance.get("kind") if exported and provenance.get("kind") in KINDS else "imported"
    step = provenance.get("step") if exported and isinstance(provenance.get("step"), int) else 0
    return {"format": FORMAT, "kind": kind, "model": state, "model_config": dataclasses.asdict(model_config),
            "tokenizer": tokenizer, "layout": hf_layout(coords, sheet, folder, model_config, state),
            "data": sheet.get("data") if exported else None, "config": {}, "iter_num": step,
            "hf": {"folder": str(folder.resolve()), "positions": coords is not None, "provenance": provenance}}


def load_source(path_or_run: str | Path) -> tuple[dict, Path]:
    """(checkpoint dict, its file or folder) of a checkpoint file, a run folder (its newest checkpoint),
    a finetuned folder (its best) or a Hugging Face folder (`hf_checkpoint`): every model this code
    loads. Raises UserError as `find_checkpoint`/`load_checkpoint`/`hf_checkpoint`."""
    if is_hf_folder(path_or_run):
        return hf_checkpoint(path_or_run), Path(path_or_run)
    path = find_checkpoint(path_or_run)
    return load_checkpoint(path), path


def load_model(path_or_run: str | Path, device: str = "cpu") -> tuple[GPT, dict, Path]:
    """(GPT in eval mode on `device`, the checkpoint dict, the file or folder) for a checkpoint file, a
    run folder or a Hugging Face folder (`load_source`).

    For a finetuned checkpoint this is its backbone. Raises UserError as `load_source`."""
    ckpt, path = load_source(path_or_run)
    try:
        gpt = build_gpt(ckpt)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    return gpt.to(device).eval(), ckpt, path


def require_positions(ckpt: dict, path: Path | str, what: str) -> None:
    """Refuse a Hugging Face folder without its unit positions (no positions.npy) before `what` starts: its
    sheet would be the identity layout, which the model was never trained with, and the results (maps, or
    scores recorded against the model's layout) would describe a sheet the model does not have."""
    hf = ckpt.get("hf")
    if hf and not hf["positions"]:
        raise UserError(f"{path} is a Hugging Face folder without unit positions (no positions.npy, as a plain GPT-2 "
                        f"has none): {what} needs the sheet the model was trained with; export the model with "
                        f"export_hf.py, which writes positions.npy and topolm.json beside the weights")


def require_gpt2_tokenizer(ckpt: dict, path: Path | str, what: str = "text") -> None:
    """Refuse a model whose token ids are not GPT-2's before any text is encoded for it."""
    tok = ckpt.get("tokenizer")
    if not tok or tok.get("name") != "gpt2":
        vocab = ckpt["model_config"]["vocab_size"]
        raise UserError(f"{path} is a model of token ids without the GPT-2 tokenizer (use a checkpoint trained on "
                        f"GPT-2 token ids with vocab_size >= {EOT_TOKEN + 1}): it has vocab_size={vocab}; "
                        f"{what} needs the GPT-2 vocabulary (at least {EOT_TOKEN + 1})")


def require_permutation_layout(ckpt: dict, path: Path | str, what: str, hint: str = "") -> None:
    """Refuse a model whose unit positions are not a permutation of the grid before `what` (something
    that computes the spatial loss) starts; such layouts come only from imported research checkpoints."""
    if not ckpt["layout"]["permutation"]:
        raise UserError(f"{path}: {what} needs the spatial loss, but {NOT_A_PERMUTATION}{hint}")
