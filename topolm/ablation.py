"""Validation loss and units zeroed at their sites or at their sublayers' inputs (the paper's causal test).

`zeroed_units` sets chosen units of chosen sites to zero, through hooks that are removed on exit (the
weights are never changed). where="site": where the site's activation is, forward hooks on the model's
site taps (model.sites()); with with_resid=False a site is the sublayer's output before the residual
addition, so zeroing a unit there removes exactly that unit's contribution; with with_resid=True the
site is the residual stream itself. where="input": the same dimensions of the input of the site's
sublayer (`input_points`: the c_attn of block i for layer.i.attn, its c_fc for layer.i.mlp), which
equals zeroing those input columns of the sublayer's first weight matrix (the research code's ablation).
Units are chosen per site (`top_units`) or over the whole network (`top_units_network`, the paper's).
"""
from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

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
    require_output_ids(model, windows[:, 1:], "")
    return windows


def require_output_ids(model, targets: np.ndarray, hint: str) -> None:
    """Refuse target token ids outside a restricted output vocabulary (output_vocab=corpus): their loss is infinite.
    targets: any shape of int token ids; hint: how to name the dataset key in the message (e.g. " (val_data=)")."""
    if model.config.n_output_ids:
        outside = ~np.isin(targets, model.output_ids.cpu().numpy())
        if outside.any():
            raise UserError(f"the validation tokens hold id {int(targets[outside][0])}, outside the model's "
                            f"output vocabulary of {model.config.n_output_ids} ids (output_vocab=corpus): its loss is "
                            f"infinite; measure on the dataset the model was trained on{hint}")


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

Where = Literal["site", "input"]
Select = Literal["site", "network"]


def input_points(model) -> dict:
    """Site name -> the linear layer whose input feeds the site's sublayer: block i's `attn.c_attn` for
    layer.i.attn, its `mlp.c_fc` for layer.i.mlp (model.py's Block: c_attn reads ln_1(x), c_fc reads
    ln_2(x), the residual stream's n_embed dimensions after the LayerNorm). Zeroing input dimension j of
    such a layer is zeroing column j of its weight, (out_features, n_embed)."""
    points = {}
    for i, block in enumerate(model.transformer.h):
        points[f"layer.{i}.attn"] = block.attn.c_attn
        points[f"layer.{i}.mlp"] = block.mlp.c_fc
    return points


def _zero_output(_module, _inputs, output, idx):
    return output.index_fill(-1, idx.to(output.device), 0.0)


def _zero_input(_module, inputs, idx):
    return (inputs[0].index_fill(-1, idx.to(inputs[0].device), 0.0), *inputs[1:])


@contextmanager
def zeroed_units(model, units: dict[str, torch.Tensor | np.ndarray | list[int]], where: Where = "site"):
    """Within the block, the given units of each named site are zero: where="site" where the site's
    activation is, where="input" in the input of the site's sublayer (`input_points`).

    units: site name -> unit indices (into n_embed). where="site": forward hooks on the site taps replace
    each tap's output by a copy with those units set to exactly 0. where="input": forward pre-hooks on the
    sublayer's first linear layer replace its input (B, T, n_embed) by a copy with those dimensions 0,
    the same product as that weight with those columns zero; the residual stream itself and every other
    reader of it are untouched. The hooks are removed on exit; the weights are never written. Raises
    ValueError for a site the model does not have or another `where`."""
    if where not in ("site", "input"):
        raise ValueError(f"where must be 'site' or 'input'; got {where!r}")
    points = model.sites() if where == "site" else input_points(model)
    unknown = [name for name in units if name not in points]
    if unknown:
        raise ValueError(f"unknown site(s) {', '.join(unknown)}; the model has {', '.join(points)}")
    handles = []
    try:
        for name, idx in units.items():
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            if len(idx) == 0:
                continue
            if where == "site":
                handles.append(points[name].register_forward_hook(functools.partial(_zero_output, idx=idx)))
            else:
                handles.append(points[name].register_forward_pre_hook(functools.partial(_zero_input, idx=idx)))
        yield
    finally:
        for h in handles:
            h.remove()


def _undefined_refusal(k: int, source: str, defined: int, total: int, where: str) -> UserError:
    return UserError(f"k={k}: {source} has a defined t_localizer at only {defined} of {total} units of {where} "
                     f"(the others are undefined: zero variance in both groups, or too few items); "
                     f"an undefined unit is not selective: choose k <= {defined}")


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
        raise _undefined_refusal(k, source, int(defined[s]), t.shape[1], site)
    return np.argsort(-np.where(np.isfinite(t), t, -np.inf), axis=1, kind="stable")[:, :k]


def top_units_network(t: np.ndarray, k: int, source: str = "the units file") -> list[np.ndarray]:
    """The k units with the largest t over all sites together (the paper's ablation): one int array per
    site (n_sites arrays whose lengths sum to k; a site may get none), each in descending order of t.
    Ties: the lower site, then the lower unit index first. t: (n_sites, n_embed). A unit whose t is
    undefined (NaN) is never chosen: raises UserError naming `k`, `source` and how many units of the
    network have a defined t when fewer than k do."""
    t = np.asarray(t, dtype=np.float64)
    defined = int(np.isfinite(t).sum())
    if defined < k:
        raise _undefined_refusal(k, source, defined, t.size, f"the network ({t.shape[0]} sites)")
    order = np.argsort(-np.where(np.isfinite(t), t, -np.inf).ravel(), kind="stable")[:k]
    site, unit = np.divmod(order, t.shape[1])
    return [unit[site == s] for s in range(t.shape[0])]


def chosen_units(t: np.ndarray, k: int, select: Select, names: list[str] | None = None,
                 source: str = "the units file") -> list[np.ndarray]:
    """The k most selective units as one int array per site: select="site" the k largest t of every site
    (`top_units`, k per site), select="network" the k largest over all sites (`top_units_network`, k in all).
    Raises UserError as those do."""
    if select == "site":
        return list(top_units(t, k, names, source))
    if select == "network":
        return top_units_network(t, k, source)
    raise ValueError(f"select must be 'site' or 'network'; got {select!r}")


def random_units(counts, n_embed: int, rng: np.random.Generator) -> list[np.ndarray]:
    """counts[s] distinct units drawn uniformly at random at each site s, one int array per site (in the
    order drawn). counts: per-site numbers, e.g. those of the most selective units, so that a random draw
    zeroes as many units at every site as they do."""
    return [rng.choice(n_embed, size=int(c), replace=False) for c in counts]


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
