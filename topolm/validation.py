"""The validation task loss and spatial loss of a model on fixed windows of a dataset's val.bin (reproduce.py).

Windows (`start_windows`): non-overlapping inputs of block_size tokens from the start of the token file,
window k the tokens [k T, (k + 1) T) with their next tokens as targets, as many as fit in `val_tokens`
(and the file): the same windows for any checkpoint of that block_size, imported ones included, with no
draw. Over them (`validation_measures`):
- task loss: mean next-token cross-entropy (nats) over every target, each window's sum in float64;
- sampled spatial loss: per batch of `batch_size` windows, the training loss of the model's sheet
  (positions.CorticalSheet.loss over neighborhoods_per_batch random neighborhoods per site, drawn by a
  generator seeded with `seed`) on that batch's site activations, before alpha, averaged over batches;
  the same for a control (alpha = 0), whose sheet is measured as if it were trained with it;
- full-grid spatial loss: topolm.analysis.full_grid_spatial_loss of every site on the unit correlations
  over all the windows' tokens (every neighborhood, not a sample).
Both spatial losses are also summed over sites, as the paper reports them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from topolm.ablation import require_output_ids
from topolm.analysis import CorrelationAccumulator, full_grid_spatial_loss
from topolm.batching import invariant_kernels
from topolm.blimp import gpt_logits
from topolm.checkpoint import recorded_val_bin
from topolm.config import DATA_DIR, UserError, resolve_path
from topolm.files import read_jsonl


def start_windows(tokens: np.ndarray, block_size: int, val_tokens: int) -> np.ndarray:
    """(n, block_size + 1) int64: window k is tokens[k * block_size : (k + 1) * block_size + 1] (inputs and their
    targets), n = min(val_tokens // block_size, (len(tokens) - 1) // block_size). Raises UserError when n is 0."""
    T = int(block_size)
    n = min(int(val_tokens) // T, (len(tokens) - 1) // T)
    if n < 1:
        raise UserError(f"val_tokens={val_tokens}: the validation windows need at least block_size = {T} tokens (and "
                        f"the file {len(tokens)} >= {T + 1}); raise val_tokens or use a longer val.bin")
    return np.stack([np.asarray(tokens[k * T:k * T + T + 1], dtype=np.int64) for k in range(n)])


def dataset_val_bin(ckpt: dict, given: str = "") -> Path | None:
    """The val.bin to measure on: `given` (a dataset folder, or a .bin file; a dataset name resolves under data/),
    else the checkpoint's recorded data (its folder, else its dataset key resolved here); None when none exists.
    Raises UserError for a `given` path without a val.bin."""
    if given:
        path = Path(given)
        path = path if path.suffix == ".bin" else resolve_path(given, DATA_DIR) / "val.bin"
        if not path.is_file():
            raise UserError(f"val_data={given}: no token file {path}")
        return path
    return recorded_val_bin(ckpt)


def read_tokens(path: Path) -> np.ndarray:
    """A uint16 token file as a read-only memmap; raises UserError for one of odd size."""
    if path.stat().st_size % 2:
        raise UserError(f"{path} is not a uint16 token file (odd size)")
    return np.memmap(path, dtype=np.uint16, mode="r")


@torch.no_grad()
def validation_measures(model, windows: np.ndarray, batch_size: int = 8, seed: int = 0, device: str = "cpu") -> dict:
    """The module's measures of `model` on `windows` (`start_windows`).

    Returns task_loss (float, nats), sampled_sl (n_sites,) and sampled_sl_sum (NaN, with `sampled_undefined`
    the reason, for a layout that is not a permutation: its neighborhoods cannot be sampled), full_grid_sl
    (n_sites,), full_grid_sl_sum, n_windows, tokens. Raises UserError for a target outside a restricted output
    vocabulary (its loss is infinite), for ids outside the vocabulary, and for a NaN loss."""
    T = model.config.block_size
    if windows.shape[1] != T + 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens; expected block_size + 1 = {T + 1}")
    if int(windows.max()) >= model.config.vocab_size:
        raise UserError(f"the validation tokens hold id {int(windows.max())} >= vocab_size={model.config.vocab_size}: "
                        f"measure on the dataset the model was trained on (val_data=)")
    require_output_ids(model, windows[:, 1:], " (val_data=)")
    names = list(model.site_names)
    taps = model.sites()
    captured: dict[str, torch.Tensor] = {}
    handles = [taps[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
               for name in names]
    k = model.config.neighborhoods_per_batch
    generator = torch.Generator(device=device).manual_seed(seed)
    sampled_undefined = None if model.sheet.permutation else (
        "the layout is not a permutation of the grid: its neighborhoods cannot be sampled (see the full-grid value)")
    acc = CorrelationAccumulator(len(names), model.config.n_embed)
    logits_fn, total, sampled = gpt_logits(model), 0.0, []
    try:
        for start in range(0, len(windows), batch_size):
            batch = torch.from_numpy(windows[start:start + batch_size]).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            with invariant_kernels(device):
                logits = logits_fn(x).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            total += float(sum(nll.double().view(len(x), T).sum(dim=1).tolist()))
            acts = [captured[name] for name in names]
            if sampled_undefined is None:
                units = model.sheet.sample_units(k, generator)
                grams = torch.stack([model.sheet.site_gram(a, units[s], k) for s, a in enumerate(acts)])
                sampled.append(model.sheet.loss(grams, model.config.accum).double().cpu().numpy())
            acc.add(np.stack([a.float().cpu().numpy().reshape(-1, a.shape[-1]) for a in acts]))
    finally:
        for h in handles:
            h.remove()
    loss = total / (len(windows) * T)
    if math.isnan(loss):
        raise UserError("the validation loss is NaN: the model's outputs are not numbers (NaN or inf in its weights?)")
    coords = model.sheet.unit_coords.cpu().numpy().astype(np.int64)
    corr = acc.correlations()
    full = np.array([full_grid_spatial_loss(corr[s], coords[s], model.config.radius) for s in range(len(names))])
    per_site = np.mean(sampled, axis=0) if sampled else np.full(len(names), np.nan)
    return {"task_loss": loss, "sampled_sl": per_site, "sampled_sl_sum": float(per_site.sum()),
            "sampled_undefined": sampled_undefined, "full_grid_sl": full, "full_grid_sl_sum": float(full.sum()),
            "n_windows": len(windows), "tokens": len(windows) * T, "site_names": names}


def last_logged_evaluation(ckpt_path: Path, alpha: float = 1.0) -> dict | None:
    """The last `eval` event of the run's log.jsonl beside the checkpoint (this project's runs): its step, the
    validation task loss and the per-site spatial loss before alpha summed (`sites`; NaN for a run of alpha 0,
    whose training never measures it and logs zeros); None without a log or an evaluation in it."""
    log = Path(ckpt_path).parent / "log.jsonl"
    if not log.is_file():
        return None
    last = None
    for _, row in read_jsonl(log, ()):
        if row.get("event") == "eval" and isinstance(row.get("val"), dict):
            last = row
    if last is None:
        return None
    sites = last["val"].get("sites") or []
    return {"step": int(last["iter"]), "task_loss": float(last["val"]["task"]),
            "sampled_sl_sum": float(sum(sites)) if sites and alpha > 0 else math.nan, "source": str(log)}
