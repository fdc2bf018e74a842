"""Position-set files: `positions.npy` (int16, sites x units x 2) and `meta.json`, as init_pos.py
writes them and train.py reads them, and the record of the model a swapopt set was optimized for.

A swapopt layout is smooth for one model's activations, so its head start holds only for that
model. Its meta.json keeps `optimized_for`: {"seed", the MODEL_KEYS, "weights_sha256"} for the
randomly initialised model that `seed` builds (train.py builds the same weights from the same seed
and keys), or {"ckpt", "step", "weights_sha256"} for a checkpoint. Random and identity layouts
depend on no model and record none. `match_model_record` is train.py's check of a run against it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from topolm.config import UserError
from topolm.files import atomic_write, read_json
from topolm.provenance import weights_digest
from positions import POSITIONS_FORMAT, check_layout, layout_shape, sheet_shape, site_names


# ----------------------------------------------------------------------------- position-set files

def save_positions(folder: str | Path, coords: np.ndarray, meta: dict, shape: tuple[int, int] | None = None) -> Path:
    """Write `positions.npy` (int16, sites x units x 2) and readable `meta.json`, each atomically.

    shape: the sheet's (rows, cols), default `positions.sheet_shape(n_embed)`; meta.json records it as
    `rows` and `cols` (and a square's as `side`)."""
    folder = Path(folder)
    n_sites, n_embed, _ = coords.shape
    rows, cols = shape or sheet_shape(n_embed)
    check_layout(coords, n_sites, n_embed, shape=(rows, cols))
    square = {"side": rows} if rows == cols else {}
    info = {"format": POSITIONS_FORMAT, **square, "rows": rows, "cols": cols, "n_embed": n_embed,
            "n_layer": n_sites // 2, "sites": site_names(n_sites // 2), **meta}
    atomic_write(folder / "positions.npy", lambda f: np.save(f, coords.astype(np.int16), allow_pickle=False))
    atomic_write(folder / "meta.json", json.dumps(info, indent=2) + "\n")
    return folder


def load_positions(folder: str | Path, n_layer: int, n_embed: int,
                   shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Read a position set and check that it fits a model of n_layer blocks and n_embed units on a rows x
    cols sheet (`shape`, default `positions.sheet_shape(n_embed)`). Raises FileNotFoundError, ValueError."""
    folder = Path(folder)
    npy = folder / "positions.npy"
    if not npy.is_file():
        raise FileNotFoundError(f"position set not found: {npy} (make one with init_pos.py)")
    try:
        coords = np.load(npy, allow_pickle=False).astype(np.int64)
        meta_file = folder / "meta.json"
        meta = read_json(meta_file) if meta_file.is_file() else {}
    except (ValueError, OSError, UserError) as e:
        raise ValueError(f"cannot read position set {folder}: {e}") from e
    want = (2 * n_layer, n_embed, 2)
    if coords.shape != want:
        raise ValueError(
            f"position set {folder} has shape {coords.shape} (n_layer={coords.shape[0] // 2}, "
            f"n_embed={coords.shape[1] if coords.ndim > 1 else '?'}); this model needs n_layer={n_layer}, n_embed={n_embed}"
        )
    rows, cols = shape or sheet_shape(n_embed)
    theirs = (meta.get("rows"), meta.get("cols")) if "rows" in meta else layout_shape(coords)
    if tuple(theirs) != (rows, cols):
        raise ValueError(f"position set {folder} is for a {theirs[0]}x{theirs[1]} sheet; this model's is "
                         f"{rows}x{cols}: set sheet_rows={theirs[0]}, or make a set for this sheet with init_pos.py "
                         f"sheet_rows={rows}")
    check_layout(coords, *want[:2], shape=(rows, cols))
    return coords, meta




# ----------------------------------------------------------------------------- the model a set was optimized for

# The keys that fix a randomly initialised model's weights (with its seed) and its site activations.
# n_layer and n_embed are the set's own shape; the rest must match too.
MODEL_KEYS = ("n_layer", "n_head", "n_embed", "vocab_size", "with_resid", "bias", "block_size")
MODEL_INDEPENDENT = ("random", "identity")  # layouts that record no model


def read_meta(folder: str | Path) -> dict:
    """A position set's meta.json ({} when the set has none). Raises FileNotFoundError when the folder
    holds no positions.npy, ValueError when meta.json is unreadable."""
    folder = Path(folder)
    if not (folder / "positions.npy").is_file():
        raise FileNotFoundError(f"position set not found: {folder / 'positions.npy'} (make one with init_pos.py)")
    meta_file = folder / "meta.json"
    try:
        meta = read_json(meta_file) if meta_file.is_file() else {}
    except UserError as e:
        raise ValueError(f"cannot read position set {folder}: {e}") from e
    return meta if isinstance(meta, dict) else {}


def initial_weights_digest(model) -> str:
    """SHA-256 (provenance.weights_digest) of a GPT's parameters alone: its buffers (the unit positions,
    the output ids) are left out, so the model a set was optimized for and the one training builds on
    that set's positions compare."""
    return weights_digest(dict(model.named_parameters(remove_duplicate=False)))


def _shape_mismatch(folder: Path, record: dict, model: dict, seed_hint: str) -> str | None:
    diff = [k for k in MODEL_KEYS if k in record and record[k] != model[k]]
    if not diff:
        return None
    init_key = {"block_size": "model_block_size"}
    theirs = ", ".join(f"{k}={record[k]}" for k in diff)
    ours = ", ".join(f"{k}={model[k]}" for k in diff)
    remake = " ".join(f"{init_key.get(k, k)}={model[k]}" for k in diff)
    return (f"position set {folder} was optimized for the model with {theirs} (seed {record.get('seed')}); this "
            f"run has {ours}, whose activations it was not optimized for: set {theirs.replace(', ', ' ')}, or make "
            f"a set for this model with init_pos.py layout=swapopt {remake}{seed_hint}")


def match_model_record(meta: dict, folder: Path, model: dict, seed: int, seed_given: bool,
                       scratch: bool = True) -> tuple[int, str | None]:
    """Check a new run on the position set `folder` (its `meta`) against the model the set was optimized for.

    model: the run's MODEL_KEYS -> value; seed: the run's seed; seed_given: whether the user gave it on
    the command line (a preset's or the default seed yields to the set's). Returns the seed to train
    with and a line to print (None: nothing to say). Raises UserError when the run's shape differs from
    the recorded model's, or when a seed given on the command line differs from the recorded seed.
    A set optimized for a checkpoint gives a warning for a run from scratch (`scratch`), and a
    model-dependent set without the record (an older init_pos.py) a note."""
    layout = meta.get("layout", "unknown")
    record = meta.get("optimized_for")
    if layout in MODEL_INDEPENDENT:
        return seed, None
    if not isinstance(record, dict) or not ("ckpt" in record or isinstance(record.get("seed"), int)):
        return seed, (f"note: position set {folder} ({layout}) does not record the model it was optimized for "
                      f"(an older init_pos.py made it): its head start holds only if this run's seed and shape are "
                      f"that model's")
    if "ckpt" in record:
        if not scratch:
            return seed, None
        return seed, (f"warning: position set {folder} was optimized for the activations of checkpoint "
                      f"{record['ckpt']} (step {record.get('step')}); a run from scratch starts from other "
                      f"weights, so the layout's head start does not carry over")
    mismatch = _shape_mismatch(folder, record, model, f" seed={seed}" if seed_given else "")
    if mismatch:
        raise UserError(mismatch)
    wanted = record["seed"]
    if seed == wanted:
        return seed, None
    if seed_given:
        raise UserError(f"seed={seed} but position set {folder} was optimized for the model that seed={wanted} "
                        f"initialises, and seed={seed} starts from other weights without its head start: set "
                        f"seed={wanted} (or leave seed out), or make a set for seed {seed} with init_pos.py "
                        f"layout=swapopt seed={seed}")
    return wanted, (f"seed={wanted}: the seed of the model position set {folder} was optimized for (instead of "
                    f"seed={seed}; a seed given on the command line must match it)")
