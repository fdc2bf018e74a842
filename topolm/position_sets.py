"""Position-set files: `positions.npy` (int16, sites x units x 2) and `meta.json`, as init_pos.py
writes them and train.py reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from topolm.config import UserError
from topolm.files import atomic_write, read_json
from positions import POSITIONS_FORMAT, check_layout, grid_side, site_names


# ----------------------------------------------------------------------------- position-set files

def save_positions(folder: str | Path, coords: np.ndarray, meta: dict) -> Path:
    """Write `positions.npy` (int16, sites x units x 2) and readable `meta.json`, each atomically."""
    folder = Path(folder)
    n_sites, n_embed, _ = coords.shape
    check_layout(coords, n_sites, n_embed)
    info = {"format": POSITIONS_FORMAT, "side": grid_side(n_embed), "n_embed": n_embed,
            "n_layer": n_sites // 2, "sites": site_names(n_sites // 2), **meta}
    atomic_write(folder / "positions.npy", lambda f: np.save(f, coords.astype(np.int16), allow_pickle=False))
    atomic_write(folder / "meta.json", json.dumps(info, indent=2) + "\n")
    return folder


def load_positions(folder: str | Path, n_layer: int, n_embed: int) -> tuple[np.ndarray, dict]:
    """Read a position set and check that it fits a model of n_layer blocks and n_embed units."""
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
    check_layout(coords, *want[:2])
    return coords, meta


