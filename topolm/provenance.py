"""Where a derived file came from: the checkpoint, its step, a digest of the model's weights, the code version.

Every file derived from a model carries `provenance(...)`: analyze.py's summary.json and units.npz,
blimp.py's and ablate.py's results, export_hf.py's topolm.json, init_pos.py's position sets made from a
checkpoint, and (through finetune.py's metrics.json) glue_summary.py's table. Importable without torch
(glue_summary.py is torch-free); the digest takes torch tensors from its caller.

- `weights_digest` is a SHA-256 over the GPT's `state_dict` in a canonical form, so that it depends on
  the weights' values alone, not on the device, the memory layout or the storage dtype: entries sorted
  by name, each hashed as its name, shape and bytes, floating tensors as little-endian float32 and all
  others (the unit positions, index buffers) as little-endian int64. A checkpoint and its Hugging Face
  export therefore share it: the export holds the same float32 values (its Conv1D matrices transposed,
  zero biases added where the GPT has none, the positions in positions.npy), and the GPT rebuilt from it
  has the same `state_dict`.
- `code_version` is the git commit of the repository these files belong to, or "unknown" (no git, or a
  copy that is not a repository); it never fails.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from topolm.config import REPO

UNKNOWN = "unknown"


def weights_digest(weights: Any) -> str:
    """Hex SHA-256 of a model's `state_dict` (or of a state dict {name: tensor} itself) in the canonical form above."""
    state: Mapping = weights.state_dict() if hasattr(weights, "state_dict") else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu()
        kind = "<f4" if t.is_floating_point() else "<i8"
        data = np.ascontiguousarray(t.float().numpy() if t.is_floating_point() else t.long().numpy(), dtype=kind)
        h.update(f"{name}:{kind}:{tuple(t.shape)}\n".encode())
        h.update(data.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version(root: Path = REPO) -> str:
    """The commit checked out in `root` (40 hex digits), or "unknown" when git or the repository is missing.

    Only a repository whose top level is `root` counts: a copy of the project inside another repository
    is "unknown", not that repository's commit."""
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != Path(root).resolve():
        return UNKNOWN
    return lines[1]


def provenance(path: Path | str, ckpt: dict, weights: Any = None) -> dict:
    """The provenance record of a file derived from the checkpoint `path` (read as `ckpt`).

    weights: the loaded GPT (or its state dict) whose digest is recorded; default the checkpoint's own
    `model` state dict (the same digest: the GPT is built from it). Returns {"checkpoint": path as given,
    "kind", "step": optimizer steps (iter_num), "weights_sha256", "code_version"}."""
    return {"checkpoint": str(path), "kind": ckpt.get("kind"), "step": ckpt.get("iter_num"),
            "weights_sha256": weights_digest(ckpt["model"] if weights is None else weights),
            "code_version": code_version()}
