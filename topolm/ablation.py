"""Validation loss and units zeroed at their sites (the paper's causal test).

`zeroed_units` sets chosen units of chosen sites to zero where the site's activation is, through
forward hooks on the model's site taps (model.sites()). With with_resid=False a site is the
sublayer's output before the residual addition, so zeroing a unit there removes exactly that
unit's contribution; with with_resid=True the site is the residual stream itself.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from topolm.batching import filled, invariant_kernels
from topolm.blimp import gpt_logits
from topolm.config import UserError


# ============================================================================= validation loss

def validation_windows(model, tokens: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """(n_windows, block_size + 1) int64 windows of `tokens` (inputs and their next-token targets), their
    starts drawn at once by a torch generator seeded with `seed`.

    Raises UserError when the tokens are fewer than block_size + 1, or when a target lies outside a
    restricted output vocabulary (its probability is 0: the loss would be infinite)."""
    T = model.config.block_size
    if len(tokens) < T + 1:
        raise UserError(f"the validation tokens ({len(tokens)}) are fewer than block_size + 1 = {T + 1}")
    starts = torch.randint(len(tokens) - T, (n_windows,), generator=torch.Generator().manual_seed(seed)).numpy()
    windows = np.stack([np.asarray(tokens[i:i + T + 1], dtype=np.int64) for i in starts])
    if model.config.n_output_ids:
        outside = ~np.isin(windows[:, 1:], model.output_ids.cpu().numpy())
        if outside.any():
            raise UserError(f"the validation tokens hold id {int(windows[:, 1:][outside][0])}, outside the model's "
                            f"output vocabulary of {model.config.n_output_ids} ids (output_vocab=corpus): its loss is "
                            f"infinite; measure on the dataset the model was trained on")
    return windows


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, n_batches: int, batch_size: int, seed: int, device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats) over n_batches x batch_size windows of block_size tokens
    (`validation_windows`: the same windows on every call, however their number is split into
    batches). Each window's token losses are summed in float64, the windows in order, so the
    number does not depend on batch_size (bit for bit on the CPU; topolm.batching).

    Raises UserError as `validation_windows`, and for a NaN loss (the model's outputs are not numbers)."""
    windows = validation_windows(model, tokens, n_batches * batch_size, seed)
    T, logits_fn, total = model.config.block_size, gpt_logits(model), 0.0
    for start in range(0, len(windows), batch_size):
        index = np.arange(start, min(start + batch_size, len(windows)))
        x = torch.from_numpy(windows[filled(index, T), :-1]).to(device)
        y = torch.from_numpy(windows[index, 1:]).to(device)
        with invariant_kernels(device):
            logits = logits_fn(x)[:len(index)].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        for window_sum in nll.double().view(len(index), T).sum(dim=1).tolist():
            total += window_sum
    loss = total / (len(windows) * T)
    if math.isnan(loss):
        raise UserError("the validation loss is NaN: the model's outputs are not numbers (NaN or inf in its weights?)")
    return loss


# ============================================================================= ablation

@contextmanager
def zeroed_units(model, units: dict[str, torch.Tensor | np.ndarray | list[int]]):
    """Within the block, the given units of each named site are zero where the site's activation is.

    units: site name -> unit indices (into n_embed). Forward hooks on the site taps replace each
    tap's output by a copy with those units set to exactly 0; the hooks are removed on exit."""
    taps = model.sites()
    unknown = [name for name in units if name not in taps]
    if unknown:
        raise ValueError(f"unknown site(s) {', '.join(unknown)}; the model has {', '.join(taps)}")
    handles = []
    try:
        for name, idx in units.items():
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            if len(idx) == 0:
                continue

            def hook(_module, _inputs, output, idx=idx):
                return output.index_fill(-1, idx.to(output.device), 0.0)
            handles.append(taps[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def top_units(t: np.ndarray, k: int, names: list[str] | None = None, source: str = "the units file") -> np.ndarray:
    """The k units with the largest t at each site, (n_sites, k), in descending order of t (ties: lower
    unit index first). A unit whose t is undefined (NaN: zero variance in both groups, or a side with
    fewer than 2 items) is never among the most selective: raises UserError naming `k`, `source` and
    how many units have a defined t when a site (named from `names`) has fewer than k of them."""
    t = np.asarray(t, dtype=np.float64)
    defined = np.isfinite(t).sum(axis=1)
    if len(defined) and defined.min() < k:
        s = int(np.argmin(defined))
        site = names[s] if names is not None else f"site {s}"
        raise UserError(f"k={k}: {source} has a defined t_localizer at only {int(defined[s])} of {t.shape[1]} units "
                        f"of {site} (the others are undefined: zero variance in both groups, or too few items); "
                        f"an undefined unit is not selective: choose k <= {int(defined.min())}")
    return np.argsort(-np.where(np.isfinite(t), t, -np.inf), axis=1, kind="stable")[:, :k]


def random_units(n_sites: int, n_embed: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct units drawn uniformly at random at each site, (n_sites, k)."""
    return np.stack([rng.choice(n_embed, size=k, replace=False) for _ in range(n_sites)])


UNITS_KEYS = ("site_names", "coords", "t_localizer")


def _describe(record: dict) -> str:
    return f"{record.get('checkpoint')} (step {record.get('step')}, weights {str(record.get('weights_sha256'))[:12]})"


def require_same_model(path: Path, data: dict, loaded: dict) -> dict:
    """The provenance of a per-unit file (`data["provenance"]`, a JSON string), checked against the loaded
    model's (`topolm.provenance.provenance`): the weights digest must match.

    Raises UserError naming both models when it does not, and when the file records no provenance (its
    model cannot be told: a control and its topographic model share their layout). Returns the record."""
    again = f"run python analyze.py ckpt={loaded['checkpoint']} and pass the units.npz it writes"
    if "provenance" not in data:
        raise UserError(f"{path} records no provenance (no model to check it against {_describe(loaded)}): {again}")
    try:
        record = json.loads(str(data["provenance"]))
        digest = record["weights_sha256"]
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: its provenance is not a record with weights_sha256 ({e}): {again}") from e
    if digest != loaded["weights_sha256"]:
        raise UserError(f"{path} was measured on {_describe(record)}, not on the model loaded, {_describe(loaded)}: "
                        f"its units are another model's; {again}")
    return record


def load_units(path: Path, model, loaded: dict) -> dict[str, np.ndarray]:
    """The analysis's per-unit arrays (`units.npz` of analyze.py), checked against `model`.

    Needs site_names (n_sites,), coords (n_sites, n_embed, 2) and t_localizer (n_sites, n_embed);
    selective_localizer (bool, same shape) is used when present. loaded: the model's provenance record
    (`topolm.provenance.provenance`); the file's must name the same weights (`require_same_model`). Raises UserError
    when the file is missing, lacks a key, or was measured on another model (other weights, sites,
    shape or unit positions)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"units file not found: {path} (analyze.py writes units.npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    missing = [k for k in UNITS_KEYS if k not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (written by analyze.py?)")
    require_same_model(path, data, loaded)
    names = [str(n) for n in data["site_names"]]
    n_embed = model.config.n_embed
    if names != list(model.site_names):
        raise UserError(f"{path} has sites {names[:3]}...; the model has {list(model.site_names)[:3]}...: measured on "
                        f"another model")
    if data["t_localizer"].shape != (len(names), n_embed):
        raise UserError(f"{path}: t_localizer has shape {data['t_localizer'].shape}; expected {(len(names), n_embed)}")
    if not np.array_equal(data["coords"], model.sheet.unit_coords.cpu().numpy()):
        raise UserError(f"{path} was measured on a model with other unit positions than this checkpoint")
    if "selective_localizer" in data and data["selective_localizer"].shape != data["t_localizer"].shape:
        raise UserError(f"{path}: selective_localizer's shape differs from t_localizer's")
    return data
