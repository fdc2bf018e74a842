"""The research code's checkpoints and position files, read without running their pickles.

The research code saved its checkpoints with `torch.save` of a dict holding an OmegaConf
`DictConfig`, and its positions as pickled `positions.LayerPositions` objects whose tensors go
through `torch.storage._load_from_bytes` (itself an unrestricted load). Neither may be read with
a plain `pickle.load` or `torch.load(weights_only=False)`: a pickle can run any code. They are read
by `RestrictedUnpickler`, which resolves only the globals in its allow-list: the tensor-rebuild
functions, the storage types, `OrderedDict`, and stand-ins that turn the research classes and
OmegaConf's into plain data (`_load_from_bytes` goes to `torch.load(..., weights_only=True)`).
Config values that are Python expressions in text (the research code `exec`s them) stay text.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from topolm.checkpoint import LEGACY_MAGIC, file_problem, first_bytes, refused_global, torch_load_reason
from topolm.config import UserError
from model import GPT, GPTConfig
from positions import sheet_shape, site_names

# ============================================================================= restricted unpickling

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class _StorageType:
    """What a pickled storage class (`torch.FloatStorage`, ...) resolves to: just its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class StandIn:
    """A research or OmegaConf object read as plain data: its class name, constructor arguments and state.

    Never runs the class's code: pickle's NEWOBJ/REDUCE only store the arguments, BUILD only the state."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"StandIn({self.qualname})"


_STAND_INS: dict[str, type] = {}


def _stand_in(qualname: str) -> type:
    if qualname not in _STAND_INS:
        _STAND_INS[qualname] = type(qualname.rsplit(".", 1)[-1], (StandIn,), {"qualname": qualname})
    return _STAND_INS[qualname]


class _LazyStorage:
    """A storage record of a zip checkpoint, read only if a tensor that needs it is materialized."""

    def __init__(self, read, key: str, dtype: torch.dtype, numel: int):
        self.read, self.key, self.dtype, self.numel = read, key, dtype, numel


class _LazyTensor:
    def __init__(self, storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def check_view(size, stride, offset, numel: int, where: str = "") -> None:
    """Refuse a strided view (sizes, strides, storage offset, in elements) that is not whole numbers >= 0
    or reaches past the `numel` elements of its storage; a view of n > 0 elements reaches element
    offset + sum((size_i - 1) * stride_i). Raises pickle.UnpicklingError, so nothing is read out of bounds."""
    size, stride = tuple(size), tuple(stride)
    numbers = (*size, *stride, offset)
    if len(size) != len(stride) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in numbers):
        raise pickle.UnpicklingError(f"a tensor{where} has size {list(size)}, stride {list(stride)} and offset "
                                     f"{offset!r}: not a view of a storage")
    if 0 not in size:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= numel:
            raise pickle.UnpicklingError(
                f"a tensor{where} of size {list(size)} (stride {list(stride)}, offset {offset}) is larger than its "
                f"storage: it needs element {last} of {numel}; the file is damaged or was not written by torch.save")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for `torch._utils._rebuild_tensor(_v2)`: a strided view of a flat storage (or a lazy one),
    checked to lie inside it."""
    if isinstance(storage, _LazyStorage):
        check_view(size, stride, storage_offset, storage.numel, f" in storage record {storage.key}")
        return _LazyTensor(storage, storage_offset, size, stride)
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    check_view(size, stride, storage_offset, storage.numel())
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_ignored):
    return data


def _storage_from_bytes(data: bytes) -> torch.Tensor:
    """Stand-in for `torch.storage._load_from_bytes`: the same bytes through the safe loader, as a flat tensor."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch.storage._load_from_bytes called without bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices of torch's legacy format
        try:
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as e:  # torch's messages span lines and advise weights_only=False
            raise pickle.UnpicklingError(f"the bytes of a tensor (torch.storage._load_from_bytes): "
                                         f"{torch_load_reason(e)}") from e
        if isinstance(storage, torch.Tensor):
            return storage.reshape(-1)
        if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
            raise pickle.UnpicklingError(f"_load_from_bytes holds a {type(storage).__name__}, not a storage")
        dtype = storage.dtype if isinstance(storage, torch.TypedStorage) else torch.uint8
        return torch.empty(0, dtype=dtype).set_(storage)


def _plain_defaultdict(*_args):
    return {}  # OmegaConf's resolver caches; their default factory is irrelevant as plain data


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an allow-list of globals; anything else is refused.

    Allowed: the tensor-rebuild functions (replaced by our own, which only build views), the
    storage types (their dtypes), `collections.OrderedDict`, `builtins.dict/list/set/tuple`,
    `torch.Size`, `torch` dtypes; `torch.storage._load_from_bytes` goes to
    `torch.load(..., weights_only=True)`; `positions.*` (the research code's classes) and
    `omegaconf.*` become `StandIn`s; `typing.Any` becomes the text "typing.Any".
    `storage_reader(key, dtype, numel)`, for zip checkpoints, returns the lazy storage of a record.
    """

    def __init__(self, file, storage_reader=None):
        super().__init__(file)
        self.storage_reader = storage_reader

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if full == "torch.storage._load_from_bytes":
            return _storage_from_bytes
        if full == "torch.Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full == "collections.defaultdict":
            return _plain_defaultdict
        if module in ("builtins", "__builtin__") and name in ("dict", "list", "set", "tuple", "frozenset"):
            return {"dict": dict, "list": list, "set": set, "tuple": tuple, "frozenset": frozenset}[name]
        if full == "typing.Any":
            return "typing.Any"
        if module == "positions" or module == "omegaconf" or module.startswith("omegaconf."):
            return _stand_in(full)
        raise pickle.UnpicklingError(refused_global(full))

    def persistent_load(self, pid):
        if self.storage_reader is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        return self.storage_reader(str(key), storage_type.dtype, int(numel))


def _materialize(obj, cache: dict, skip: tuple = (), seen: set | None = None):
    """Replace lazy tensors by real ones (reading their records once each), recursively.

    Stand-ins are visited once (OmegaConf nodes point back to their parents)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _LazyTensor):
        s = obj.storage
        if (s.key, s.dtype, s.numel) not in cache:  # the same record may be named with two element counts
            raw = s.read(s.key)
            want = s.numel * torch.empty(0, dtype=s.dtype).element_size()
            if len(raw) != want:
                raise UserError(f"storage record {s.key} holds {len(raw)} bytes; expected {want}")
            cache[s.key, s.dtype, s.numel] = (torch.frombuffer(bytearray(raw), dtype=s.dtype) if want
                                              else torch.empty(0, dtype=s.dtype))
        return cache[s.key, s.dtype, s.numel].as_strided(obj.size, obj.stride, obj.offset)
    if isinstance(obj, dict):
        return type(obj)((k, None if k in skip else _materialize(v, cache, (), seen)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, cache, (), seen) for v in obj)
    if isinstance(obj, StandIn) and id(obj) not in seen:
        seen.add(id(obj))
        obj.state = _materialize(obj.state, cache, (), seen)
        obj.args = _materialize(obj.args, cache, (), seen)
    return obj


def load_torch_zip(path: Path, skip_keys: tuple = ()) -> object:
    """A `torch.save` zip file read through `RestrictedUnpickler`, its tensors materialized; the
    top-level keys in `skip_keys` (e.g. the optimizer state) become None without reading their data.

    Raises UserError for a file that is not such a zip, or for a global outside the allow-list."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; ckpt= takes the research checkpoint file inside it (e.g. {path}/ckpt.pt)")
    if not path.is_file():
        raise UserError(f"research checkpoint not found: {path}")
    if problem := file_problem(path):
        raise UserError(f"cannot read {path}: {problem}")
    with open(path, "rb") as f:
        if f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC:
            raise UserError(f"cannot read {path}: it is in torch's legacy format (torch < 1.6), which this importer does "
                            f"not read; save it again with torch >= 1.6 where it was written")
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise UserError(f"{path} is not a torch.save zip file (no single <name>/data.pkl)")
            prefix = pickles[0][:-len("data.pkl")]
            if f"{prefix}byteorder" in z.namelist() and z.read(f"{prefix}byteorder").strip() != b"little":
                raise UserError(f"{path} was written on a big-endian machine; convert it there")

            def reader(key, dtype, numel):
                return _LazyStorage(lambda k: z.read(f"{prefix}data/{k}"), key, dtype, numel)
            obj = RestrictedUnpickler(io.BytesIO(z.read(pickles[0])), reader).load()
            return _materialize(obj, {}, skip_keys)
    except zipfile.BadZipFile as e:  # a record that fails its CRC, a damaged header
        raise UserError(f"cannot read {path}: it is damaged ({e}); copy it again") from e
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: {torch_load_reason(e)}") from e


def load_pickle(path: Path) -> object:
    """A plain pickle file read through `RestrictedUnpickler` (raises UserError as `load_torch_zip`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head.startswith(b"\x80"):  # the PROTO opcode of every pickle of protocol 2 or later
                what = first_bytes(head) if head else "nothing (0 bytes)"
                raise UserError(f"cannot read {path}: it is not a pickle (it begins with {what}; a pickle of "
                                f"protocol 2 or later begins with byte 0x80)")
            f.seek(0)
            return RestrictedUnpickler(f).load()
    except FileNotFoundError as e:
        raise UserError(f"file not found: {path}") from e
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise UserError(f"cannot read {path}: {torch_load_reason(e)}") from e


def to_plain(obj, _depth: int = 0):
    """Stand-ins as plain data: an OmegaConf container as its dict/list of values (nodes as their
    value), any other stand-in as the dict of its attributes. Tensors and plain values pass through.

    Raises UserError for structures nested deeper than 100 levels (a cycle)."""
    if _depth > 100:
        raise UserError("a pickled structure is nested more than 100 levels deep (or refers to itself)")
    d = _depth + 1
    if isinstance(obj, StandIn):
        state = obj.state
        if obj.qualname.startswith("omegaconf.") and isinstance(state, dict):
            if "_content" in state:
                return to_plain(state["_content"], d)
            if "_val" in state:
                return to_plain(state["_val"], d)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        return to_plain(state, d) if state is not None else {}
    if isinstance(obj, dict):
        return {to_plain(k, d): to_plain(v, d) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, d) for v in obj]
    return obj


# ============================================================================= import of research checkpoints

RESEARCH_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's wrappers


def _plain_number(config: dict | None, key: str):
    """A config value when it is a plain number (not a Python expression in text), else None."""
    value = (config or {}).get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def research_side(n_embed: int) -> int:
    """The side of the research code's square sheet of n_embed units (it places units on sqrt(n_embed) x
    sqrt(n_embed) cells). Raises ValueError when n_embed is not a perfect square."""
    rows, cols = sheet_shape(n_embed)
    if rows != cols:
        raise ValueError(f"n_embed={n_embed} is not a perfect square: the research code's sheets are side x side")
    return rows


def read_research_positions(folder: Path, n_layer: int, n_embed: int) -> dict:
    """The research code's positions folder (`layer.{i}.{attn,mlp}.pkl`) as plain arrays.

    Returns {"coords": int64 (n_sites, n_embed, 2) in site order, "radius": from the neighborhood
    masks' member count (2r-1)^2, "neighborhoods_per_batch": int or None, "n_masks": masks per site}.
    Raises UserError for missing files, wrong shapes, coordinates that are not grid cells, or masks
    that do not all have the same odd-square member count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"positions folder not found: {folder}")
    side = research_side(n_embed)
    coords, members, per_batch, n_masks = [], set(), set(), set()
    for name in site_names(n_layer):
        path = folder / f"{name}.pkl"
        if not path.is_file():
            raise UserError(f"{folder} has no {path.name}: a research positions folder holds layer.{{i}}.{{attn,mlp}}.pkl "
                            f"for each of the checkpoint's {n_layer} layers")
        obj = load_pickle(path)
        if not (isinstance(obj, StandIn) and obj.qualname == "positions.LayerPositions"):
            raise UserError(f"{path} holds {obj!r}, not a positions.LayerPositions")
        pos = to_plain(obj)
        xy, mask = pos.get("coordinates"), pos.get("neighborhood_indices")
        if not isinstance(xy, torch.Tensor) or tuple(xy.shape) != (n_embed, 2):
            shape = tuple(xy.shape) if isinstance(xy, torch.Tensor) else None
            raise UserError(f"{path}: coordinates of shape {shape}; the checkpoint needs ({n_embed}, 2)")
        xy = xy.double().numpy()
        if not np.array_equal(xy, np.round(xy)) or xy.min() < 0 or xy.max() >= side:
            raise UserError(f"{path}: coordinates are not cells of the {side}x{side} grid")
        coords.append(xy.astype(np.int64))
        if pos.get("name", name) != name:
            raise UserError(f"{path} holds the positions of site {pos.get('name')!r}, not {name!r}")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != n_embed:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
            raise UserError(f"{path}: neighborhood_indices of shape {shape}; expected (M, {n_embed})")
        members.update(int(c) for c in (mask != 0).sum(dim=1).unique())
        n_masks.add(int(mask.shape[0]))
        if pos.get("neighborhoods_per_batch") is not None:
            per_batch.add(int(pos["neighborhoods_per_batch"]))
    if len(members) != 1:
        raise UserError(f"{folder}: neighborhood masks have {sorted(members)} members; one (2r-1)^2 count was expected")
    m = members.pop()
    width = math.isqrt(m)
    if width * width != m or width % 2 == 0:
        raise UserError(f"{folder}: neighborhood masks have {m} members, not (2r-1)^2 for any radius r")
    if len(per_batch) > 1:
        raise UserError(f"{folder}: sites disagree on neighborhoods_per_batch ({sorted(per_batch)})")
    return {"coords": np.stack(coords), "radius": (width + 1) // 2,
            "neighborhoods_per_batch": per_batch.pop() if per_batch else None, "n_masks": sorted(n_masks)}


def read_research_checkpoint(path: Path) -> dict:
    """The research checkpoint as plain data: `model` (state_dict: weight name -> tensor), `model_args`
    (dict), `config` (dict or None), `iter_num` (int), `best_val_loss` (float or None). The optimizer
    state is not read. Raises UserError naming the field that is not of its kind."""
    raw = load_torch_zip(path, skip_keys=("optimizer",))
    if not isinstance(raw, dict) or "model" not in raw or "model_args" not in raw:
        keys = sorted(map(repr, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{path} is not a research checkpoint (it needs 'model' and 'model_args'; has {keys})")
    model, args = raw["model"], to_plain(raw["model_args"])
    if not isinstance(model, dict):
        raise UserError(f"{path}: its 'model' is a {type(model).__name__}, not a state_dict (weight names and tensors)")
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: its 'model' holds {key!r}: {type(value).__name__}; a state_dict holds weight "
                            f"names and tensors")
    if not isinstance(args, dict):
        raise UserError(f"{path}: its model_args is a {type(args).__name__}, not a dict of the model's settings")
    iter_num, best = raw.get("iter_num") or 0, raw.get("best_val_loss")
    if isinstance(iter_num, torch.Tensor) and iter_num.numel() == 1:
        iter_num = iter_num.item()
    if not isinstance(iter_num, int) or isinstance(iter_num, bool):
        raise UserError(f"{path}: its iter_num is {iter_num!r}, not a whole number of steps")
    if isinstance(best, torch.Tensor) and best.numel() != 1:
        raise UserError(f"{path}: its best_val_loss is a tensor of shape {tuple(best.shape)}, not one number")
    return {
        "model": dict(model),
        "model_args": args,
        "config": to_plain(raw.get("config")),
        "iter_num": iter_num,
        "best_val_loss": float(best) if isinstance(best, (torch.Tensor, int, float)) else None,
    }


def strip_prefixes(key: str) -> str:
    """A state_dict key without the wrappers' prefixes, in any nesting and order (`module._orig_mod.` is
    DDP around a compiled model, `_orig_mod.module.` a compiled DDP model)."""
    while key.startswith(RESEARCH_PREFIXES):
        key = key[len(next(p for p in RESEARCH_PREFIXES if key.startswith(p))):]
    return key


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        bare = strip_prefixes(key)
        if bare in out:
            raise UserError(f"two weights are both {bare!r} once the wrappers' prefixes are removed "
                            f"(one of them is {key!r}): the checkpoint holds two models")
        out[bare] = value
    return out


SIZE_KEYS = ("n_layer", "n_head", "n_embed", "block_size", "vocab_size")


def _model_sizes(args: dict, state: dict, path: Path) -> dict:
    """model_args' sizes as whole numbers >= 1, checked against the weights (layers, the token and position
    embeddings) before anything of that size is built. Raises UserError naming the key."""
    missing = [k for k in SIZE_KEYS if k not in args]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}")
    for key in SIZE_KEYS:
        value = args[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: model_args {key}={value!r} is not a whole number >= 1")
    sizes = {k: args[k] for k in SIZE_KEYS}
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if len(layers) != sizes["n_layer"] or (layers and max(layers) != sizes["n_layer"] - 1):  # layers 0 .. n_layer-1
        raise UserError(f"{path}: model_args n_layer={sizes['n_layer']} but the weights hold layers "
                        f"{sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''}")
    for name, rows, cols in (("transformer.wte.weight", "vocab_size", "n_embed"),
                             ("transformer.wpe.weight", "block_size", "n_embed")):
        want = (sizes[rows], sizes[cols])
        if name in state and tuple(state[name].shape) != want:
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)} but model_args {rows}={want[0]}, "
                            f"{cols}={want[1]} need {want}")
    try:
        research_side(sizes["n_embed"])
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e
    return sizes


def convert_research(ckpt_path: Path, positions_dir: Path, ignore_activation_decay: bool = False) -> tuple[GPT, dict]:
    """Our GPT from a research checkpoint and its positions folder, with a record of the conversion.

    Model shape, bias, dropout, alpha, accum and with_resid (missing: True, the older code's sites
    after the residual addition) come from `model_args`; radius from the positions' masks and
    neighborhoods_per_batch from the positions (else the config's plain value), each checked
    against the config's plain value where there is one. Raises UserError, before anything is
    written, for what cannot be converted: `head_loss` or `attn_proj` on (modules and losses this
    model does not have), a non-zero `activation_decay` (a training term this trainer lacks; pass
    `ignore_activation_decay` to convert for sampling and analysis), weights that do not fit."""
    ckpt_path, positions_dir = Path(ckpt_path), Path(positions_dir)
    research = read_research_checkpoint(ckpt_path)
    args, config = research["model_args"], research["config"] if isinstance(research["config"], dict) else None
    for key in ("head_loss", "attn_proj"):
        if args.get(key):
            raise UserError(f"{ckpt_path}: model_args {key}={args[key]!r}; this trainer has no {key}, so the model "
                            f"cannot be converted")
    decay = args.get("activation_decay") or 0.0
    if decay and not ignore_activation_decay:
        raise UserError(f"{ckpt_path}: model_args activation_decay={decay}; this trainer has no activation decay, so "
                        f"continued training would change the objective (pass ignore_activation_decay=true to convert "
                        f"it for sampling and analysis)")
    state = _strip_prefixes(research["model"])
    sizes = _model_sizes(args, state, ckpt_path)
    n_layer, n_embed = sizes["n_layer"], sizes["n_embed"]
    pos = read_research_positions(positions_dir, n_layer, n_embed)

    for key in ("dropout", "alpha"):
        if args.get(key) is not None and (not isinstance(args[key], (int, float)) or isinstance(args[key], bool)):
            raise UserError(f"{ckpt_path}: model_args {key}={args[key]!r} is not a number")
    radius, per_batch = pos["radius"], pos["neighborhoods_per_batch"]
    for key, ours in (("radius", radius), ("neighborhoods_per_batch", per_batch)):
        theirs = _plain_number(config, key)
        if theirs is not None and ours is not None and int(theirs) != ours:
            raise UserError(f"{positions_dir} gives {key}={ours} but the checkpoint's config says {key}={theirs}: "
                            f"these positions do not belong to this checkpoint")
    if per_batch is None:
        per_batch = _plain_number(config, "neighborhoods_per_batch")
    if per_batch is None:
        raise UserError(f"neither {positions_dir} nor the checkpoint's config gives neighborhoods_per_batch as a number")
    try:
        cfg = GPTConfig(n_layer=n_layer, n_head=sizes["n_head"], n_embed=n_embed,
                        block_size=sizes["block_size"], vocab_size=sizes["vocab_size"],
                        bias=bool(args.get("bias", False)), dropout=float(args.get("dropout") or 0.0),
                        with_resid=bool(args.get("with_resid", True)), radius=radius,
                        neighborhoods_per_batch=int(per_batch), alpha=float(args.get("alpha") or 0.0),
                        accum=str(args.get("accum") or "mean"))
    except ValueError as e:
        raise UserError(f"{ckpt_path}: cannot convert model_args: {e}") from e

    state = {k: v for k, v in state.items()
             if not (re.fullmatch(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", k) and v.dim() == 4)}  # causal masks
    gpt = GPT(cfg, positions=pos["coords"])
    ours = {k for k in gpt.state_dict() if k != "sheet.unit_coords"}
    unexpected, absent = sorted(set(state) - ours), sorted(ours - set(state))
    if unexpected or absent:
        raise UserError(f"{ckpt_path}: weights do not fit this model: "
                        + "; ".join(x for x in (f"unexpected {', '.join(unexpected[:6])}" if unexpected else "",
                                                f"missing {', '.join(absent[:6])}" if absent else "") if x))
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise UserError(f"{ckpt_path}: lm_head.weight differs from transformer.wte.weight; this model ties them")
    try:
        gpt.load_state_dict({**state, "sheet.unit_coords": gpt.sheet.unit_coords}, strict=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt_path}: weights do not fit this model: {str(e).splitlines()[-1].strip()}") from e
    record = {
        "checkpoint": str(ckpt_path), "positions": str(positions_dir), "model_args": args,
        "config": config, "iter_num": research["iter_num"], "best_val_loss": research["best_val_loss"],
        "with_resid_in_model_args": "with_resid" in args, "masks_per_site": pos["n_masks"],
    }
    return gpt, record


