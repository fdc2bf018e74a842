"""The pieces of a training loop that train.py and finetune.py share (torch side).

Each script keeps its own readable loop; this module holds what both loops call: the optimizer
step with DDP / autocast / fp16 grad scaler / torch.compile and the non-finite check
(`Optimization`), the learning-rate schedule, the random streams and their state, the JSON
log and wandb (or its null stand-in), rank digests, the owner of a run's
checkpoints (`RunCheckpoints`), the spatial loss's weight schedule (`alpha_factor_at`), the stop
check of an evaluation batch (`reduce_with_stop`; the stop flag itself: topolm/signals.py) and the
GPU peak-FLOPs table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from topolm.checkpoint import checkpoint_iter, list_checkpoints, save_checkpoint
from topolm.config import UserError
from topolm.distributed import Dist, print0, raise_together
from topolm.signals import StopFlag
from topolm.provenance import weights_digest as params_digest  # noqa: F401  (the DDP end check: same weights on every rank)
from model import configure_adamw

# ----------------------------------------------------------------------------- precision and devices


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a GPU with bf16, float16 on other GPUs, float32 on CPU; refuses bf16 on a GPU without it."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype=bfloat16 but the GPU {device} has no bf16 support; use dtype=float16")
    return dtype


def autocast_context(device: str, dtype: str):
    if dtype == "float32":
        return nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device_type=torch.device(device).type, dtype=ptdtype)


# Dense bf16 peak (vendors' datasheets, dense, without sparsity). Looked up most specific name first: "L40S" must not match "L4",
# nor "H100 PCIe" the SXM figure.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("4090", 165e12),
)


def peak_flops_for_name(name: str) -> float | None:
    """The dense bf16 peak of a GPU from its `torch.cuda.get_device_name`, None where unknown."""
    matches = [(len(key), value) for key, value in PEAK_BF16_FLOPS if key in name]
    return max(matches)[1] if matches else None


def peak_flops(device: str) -> float | None:
    """The device's dense bf16 peak, for MFU; None where unknown (CPU)."""
    if not device.startswith("cuda"):
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


# ----------------------------------------------------------------------------- schedule and random streams

def learning_rate_at(it: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule).

    `cfg` has learning_rate, decay_lr, warmup_iters, lr_decay_iters and min_lr (topolm.config.OptimizerConfig)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def alpha_factor_at(it: int, cfg) -> float:
    """The factor on every site's spatial-loss weight at optimizer step `it` (0-based).

    `cfg` has alpha_schedule, alpha_warmup_iters (W), alpha_decay_iters (D) and alpha_final (train.py's
    TrainConfig). 'constant': 1. 'linear': it / W for it < W, then 1. 'cosine': it / W for it < W (no
    warm-up when W = 0), then alpha_final + (1 - alpha_final) * (1 + cos(pi * (it - W) / (D - W))) / 2 up
    to D, alpha_final from D on (the cosine of nanoGPT's learning rate, on the weight instead)."""
    if cfg.alpha_schedule == "constant":
        return 1.0
    warmup = cfg.alpha_warmup_iters
    if it < warmup:
        return it / warmup
    if cfg.alpha_schedule == "linear":
        return 1.0
    if it >= cfg.alpha_decay_iters:
        return float(cfg.alpha_final)
    ratio = (it - warmup) / (cfg.alpha_decay_iters - warmup)
    return cfg.alpha_final + (1.0 - cfg.alpha_final) * 0.5 * (1.0 + math.cos(math.pi * ratio))


STREAMS = {"batch": 1, "nbhd": 2, "dropout": 3}

# Strides of the seeds that evaluation and finetuning's epochs derive from the run's seed (the 1,000th and
# the 10,000th prime). Their values are part of every result: another value would move the published
# losses and figures, and would change the epoch order of a finetuning resumed from an earlier checkpoint.
BATCH_SEED_STRIDE = 7919
NBHD_SEED_STRIDE = 104729


def eval_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(batch seed, neighborhood seed) of one rank's evaluation generators, the same at every evaluation."""
    return seed + BATCH_SEED_STRIDE * (rank + 1), seed + NBHD_SEED_STRIDE * (rank + 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of finetuning's shuffle of the training set in `epoch` (0-based)."""
    return seed + BATCH_SEED_STRIDE * epoch


def stream_seed(seed: int, stream: str, rank: int, iteration: int = 0) -> int:
    """Seed of one training stream of one rank, started at `iteration`.

    A run that must re-seed (resumed on another number of ranks) starts its streams at the
    iteration it resumes from, so it never replays the batches and neighborhoods of the first
    steps in order. numpy's SeedSequence mixes the four numbers into independent 63-bit seeds."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], rank, iteration]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def rng_state(generators: dict[str, torch.Generator], device: str) -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    for name, g in generators.items():
        state[name] = g.get_state().cpu()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator], device: str) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.startswith("cuda") and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    for name, g in generators.items():
        g.set_state(state[name])


def restore_streams(ckpt: dict, generators: dict[str, torch.Generator], d: Dist, seed: int, what: str) -> None:
    """Continue every random stream from a checkpoint written by the same number of ranks; otherwise
    re-seed them from (seed, rank, iteration) and say so."""
    if ckpt.get("world_size") == d.world_size:
        set_rng_state(ckpt["rng"][d.rank], generators, d.device)
        return
    it = ckpt["iter_num"]
    for name, g in generators.items():
        g.manual_seed(stream_seed(seed, name, d.rank, it))
    torch.manual_seed(stream_seed(seed, "dropout", d.rank, it))
    print0(f"warning: {what} was written by {ckpt.get('world_size')} ranks, now {d.world_size}: random streams are "
           f"re-seeded from the seed, rank and iteration {it}, so the run continues with new data but not bit-exactly")


# ----------------------------------------------------------------------------- distributed helpers

def gather_objects(obj, d: Dist) -> list:
    if not d.ddp:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_with_stop(values: torch.Tensor, stop: StopFlag | None, d: Dist) -> tuple[torch.Tensor, bool]:
    """One evaluation batch's `values` (1-D) summed over ranks and whether any rank was asked to stop, in one
    all-reduce: every rank then leaves an evaluation at the same batch. Collective under DDP (all ranks call
    it once per batch); a single process gets `values` back as they are and its own flag."""
    requested = bool(stop is not None and stop.requested)
    if not d.ddp:
        return values, requested
    flat = torch.cat([values.reshape(-1), torch.tensor([float(requested)], dtype=values.dtype, device=values.device)])
    dist.all_reduce(flat)
    return flat[:-1], bool(flat[-1].item() > 0)


def accumulation_per_rank(total: int, d: Dist) -> int:
    """Micro-steps per rank for `total` micro-batches per optimizer step over all ranks (gradient_accumulation_steps)."""
    if total % d.world_size:
        fix = total + d.world_size - total % d.world_size
        raise UserError(f"gradient_accumulation_steps={total} is not divisible by the {d.world_size} ranks; set "
                        f"gradient_accumulation_steps={fix} (a multiple of {d.world_size}) or run on fewer ranks")
    return total // d.world_size


# ----------------------------------------------------------------------------- log

class JsonLog:
    """log.jsonl in a run folder, written by rank 0 only: appended on resume, never truncated;
    `fresh=True` (a new run, or an overwrite) starts it empty."""

    def __init__(self, path: Path, enabled: bool, fresh: bool = False):
        self.path, self.enabled = Path(path), enabled
        if enabled and fresh:
            self.path.unlink(missing_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def wandb_logged_in() -> bool:
    """Whether wandb has credentials here (an API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_wandb(cfg) -> None:
    """Refuse wandb_log=true without the wandb package, before anything is written."""
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401  (start_wandb uses it on rank 0)
        except ImportError as e:
            raise UserError(f"wandb_log=true but wandb cannot be imported ({e}); pip install wandb "
                            f"(see requirements.txt) or set wandb_log=false") from e


def _keep_wandb_in(folder: Path) -> None:
    """Offline, wandb's own service logs go to its cache folder (~/.cache/wandb by default): keep them
    in the run folder instead, unless the user chose a place."""
    os.environ.setdefault("WANDB_CACHE_DIR", str(folder / "cache"))


class NullRun:
    """What a loop logs to when there is no wandb run (wandb_log off, or a rank other than 0): nothing."""
    id = None

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def start_wandb(cfg, run_dir: Path, name: str, run_id: str | None, enabled: bool = True):
    """A wandb run for `cfg` on rank 0 (`enabled`), else a `NullRun`: also when cfg.wandb_log is off.

    Without credentials (and without WANDB_MODE set) it logs offline into `run_dir/wandb` with a
    one-line notice, so a preset with wandb_log=true never needs the network or an account; an
    online start that fails (no network: after wandb's init_timeout, WANDB_INIT_TIMEOUT) falls back
    to offline the same way. Offline, everything wandb writes stays under `run_dir/wandb`."""
    if not (cfg.wandb_log and enabled):
        return NullRun()
    import wandb

    folder = Path(run_dir) / "wandb"
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not wandb_logged_in():
        mode = "offline"
        print0(f"wandb: no login found; logging offline into {folder} (upload later with `wandb sync`)")
    if mode in ("offline", "dryrun", "disabled"):
        _keep_wandb_in(folder)

    def init(mode):
        return wandb.init(project=cfg.wandb_project, name=name, config=dataclasses.asdict(cfg), id=run_id,
                          resume="allow", dir=str(run_dir), mode=mode)

    if mode in ("offline", "dryrun", "disabled"):
        return init(mode)
    try:
        return init(mode)
    except Exception as e:  # wandb raises its own CommError/UsageError/timeouts; the run must go on
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print0(f"wandb: cannot start an online run ({reason}); logging offline into {folder} "
               f"(upload later with `wandb sync`)")
        _keep_wandb_in(folder)
        return init("offline")


# ----------------------------------------------------------------------------- the optimizer step

class StepResult(NamedTuple):
    """What one optimizer step did."""
    stats: dict[str, float | list[float]]  # each logged statistic, averaged over the micro-batches
    grad_norm: float  # before clipping (inf or nan when non-finite)
    skipped: bool  # the optimizer did not update the weights (non-finite values, or the fp16 scaler's overflow)
    loss_scale: float | None  # the fp16 grad scaler's scale used for this step; None without the scaler
    stop: bool  # some rank asked to stop: checkpoint and exit after this step


MicroStep = Callable[[torch.nn.Module], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Optimization:
    """The optimizer step that train.py and finetune.py share.

    Owns AdamW, the fp16 grad scaler, autocast, torch.compile and the DDP wrapper. `step` runs the
    micro-batches of one optimizer step (gradients synchronised on the last one only), unscales,
    clips, and then does one small collective that tells every rank which checked statistic (if
    any) went non-finite and whether any rank was asked to stop, so that all ranks take the same
    branch. `cfg` has the optimizer keys (topolm.config.OptimizerConfig), `compile` and `nonfinite`.
    """

    def __init__(self, raw_model: torch.nn.Module, cfg, d: Dist, dtype: str):
        self.raw_model, self.cfg, self.d, self.dtype = raw_model, cfg, d, dtype
        device_type = torch.device(d.device).type
        self.ctx = autocast_context(d.device, dtype)
        self.optimizer = configure_adamw(raw_model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                         device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
        self.model = raw_model

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def wrap(self) -> torch.nn.Module:
        """Compile and/or wrap in DDP (after any state is loaded into the raw model)."""
        if self.cfg.compile:
            print0("compiling the model...")
            self.model = torch.compile(self.model)
        if self.d.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            device_ids = [self.d.local_rank] if self.d.device.startswith("cuda") else None
            self.model = DDP(self.model, device_ids=device_ids)
        return self.model

    def forward(self, it: int, micro_step: MicroStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch of optimizer step `it`: `micro_step(model)` under autocast.

        The one place a micro-batch's losses pass through on their way to backward: a test injects a
        fault at a named iteration by wrapping this method (e.g. a non-finite loss when `it` is 3)."""
        with self.ctx:
            return micro_step(self.model)

    def step(self, it: int, lr: float, accum_steps: int, micro_step: MicroStep, checks: dict[str, str | list[str]],
             stop_requested: bool) -> StepResult:
        """One optimizer step at learning rate `lr`.

        `micro_step(model)` runs one micro-batch forward (under autocast) and returns (loss to
        minimise, named statistics: scalar or 1-D tensors). `checks` names the statistics to check
        for non-finite values, with the label(s) an error names (a list: one label per element)."""
        sums: dict[str, torch.Tensor] = {}
        scalar: dict[str, bool] = {}
        for micro in range(accum_steps):
            sync = nullcontext() if (not self.d.ddp or micro == accum_steps - 1) else self.model.no_sync()
            with sync:
                loss, stats = self.forward(it, micro_step)
                self.scaler.scale(loss / accum_steps).backward()
            for name, value in stats.items():
                scalar[name] = value.dim() == 0
                value = value.detach().float().reshape(-1)
                sums[name] = value if name not in sums else sums[name] + value
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)

        labels = [label for name in checks for label in
                  (checks[name] if isinstance(checks[name], list) else [checks[name]])]
        checked = [sums[name] for name in checks]
        finite = torch.cat([torch.isfinite(v) for v in checked]
                           + [torch.isfinite(grad_norm.reshape(1).to(checked[0].device))]).float()
        grad_label = "gradient norm"
        if self.dtype == "float16":
            # The scaler handles overflowing fp16 gradients itself (skip, lower the scale; said below). Once
            # its scale is below 1 the gradients are non-finite unscaled too: a real fault, checked as such.
            if self.scaler.get_scale() >= 1.0:
                finite[-1] = 1.0
            grad_label = f"gradient norm (at fp16 loss scale {self.scaler.get_scale():g})"
        flags = torch.cat([finite, torch.tensor([float(stop_requested)], device=finite.device)])
        if self.d.ddp:
            flags[:-1] = -flags[:-1]  # MIN over finite flags, MAX over the stop flag, in one MAX
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags[:-1] = -flags[:-1]
        flags = flags.tolist()
        bad = [label for label, ok in zip(labels + [grad_label], flags[:-1]) if ok < 1]
        if bad and self.cfg.nonfinite == "stop":
            raise UserError(f"non-finite loss at iteration {it}: {', '.join(bad)}; the last good "
                            f"checkpoint is kept (set nonfinite=skip to skip such steps)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if bad:
            print0(f"iteration {it}: non-finite {', '.join(bad)}; optimizer step skipped")
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        # The scaler skips the update itself when the scaled gradients overflowed; it then lowers its scale.
        skipped = bool(bad) or (scale is not None and self.scaler.get_scale() < scale)
        self.optimizer.zero_grad(set_to_none=True)
        means = {name: (v / accum_steps).tolist() for name, v in sums.items()}
        stats = {name: v[0] if scalar[name] else v for name, v in means.items()}
        return StepResult(stats, float(grad_norm), skipped, scale, flags[-1] > 0)


# ----------------------------------------------------------------------------- a run's checkpoints

class RunCheckpoints:
    """The one owner of a run's checkpoints: when one is due, what goes in, writing, pruning.

    `folder` is the run's folder, `interval` the steps between periodic checkpoints, `start_iter`
    the iteration the run (re)started at and `last_iter` its final one. `keep_last` > 0 keeps only
    the newest that many `ckpt-<iter>.pt` files of the folder, and with `keep_every` = n > 0 also those whose
    iteration is a multiple of n x interval; `always=False` writes a periodic
    checkpoint only after an evaluation that improved. Every checkpoint carries every rank's
    random streams and the rank count; a resumable one also the optimizer and scaler state and the
    loop's own state, so that `restore` continues the run bit-exactly. Writing is a collective: all
    ranks call `save`; rank 0 writes, atomically (topolm.checkpoint.save_checkpoint)."""

    def __init__(self, folder: Path, d: Dist, opt: Optimization, generators: dict[str, torch.Generator], *,
                 interval: int, start_iter: int, last_iter: int, keep_last: int = 0, always: bool = True,
                 keep_every: int = 0):
        self.folder, self.d, self.opt, self.generators = Path(folder), d, opt, generators
        self.interval, self.start_iter, self.last_iter = interval, start_iter, last_iter
        self.keep_last, self.always, self.keep_every = keep_last, always, keep_every

    def pruned(self) -> list[Path]:
        """The checkpoints of the folder that keep_last and keep_every do not keep (oldest first)."""
        if not self.keep_last:
            return []
        kept_every = self.keep_every * self.interval
        return [old for old in list_checkpoints(self.folder)[:-self.keep_last]
                if not (kept_every and checkpoint_iter(old) % kept_every == 0)]

    def due(self, it: int, improved: bool = True) -> bool:
        """Whether a checkpoint is due after `it` steps: every `interval` steps (with always=False only
        if the last evaluation `improved`) and after the last step; never at the step the run started from."""
        if it == self.start_iter:
            return False
        return it == self.last_iter or (it % self.interval == 0 and (self.always or improved))

    def save(self, path: Path, payload: dict, resumable: bool = True, **loop_state) -> None:
        """Write `payload` (topolm.checkpoint.make_payload's dict), `loop_state` and every rank's random
        streams to `path`; with `resumable`, also the optimizer and scaler state. Then prune to keep_last."""
        rng = gather_objects(rng_state(self.generators, self.d.device), self.d)
        error = None
        if self.d.is_main:
            resume = self.opt.state_dict() if resumable else {}
            try:
                save_checkpoint({**payload, **resume, **loop_state, "rng": rng, "world_size": self.d.world_size}, path)
            except UserError as e:  # a full disk: the earlier checkpoints stay, and every rank stops
                error = e
            else:
                for old in self.pruned():
                    old.unlink()
        raise_together(self.d, error)

    def restore(self, ckpt: dict, seed: int, what: str) -> None:
        """Continue the optimizer, the scaler and every random stream from a checkpoint `save` wrote
        (`what` names it in the warning of a resume on another number of ranks)."""
        self.opt.load_state_dict(ckpt)
        restore_streams(ckpt, self.generators, self.d, seed, what)


def resume_command(**keys: str) -> str:
    """The command line that continues the running command after a stop: its own arguments (sys.argv)
    with init_from=resume and each of `keys` (e.g. out_dir, run_name) set, replacing what was given, as
    `python <script> ...` (under torchrun on one node, `torchrun --standalone --nproc_per_node=N <script> ...`).
    Every word is shell-quoted, so the line can be pasted as it is."""
    import shlex
    import sys

    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    keys = {**keys, "init_from": "resume"}
    kept = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in keys]
    words = [str(script), *kept, *(f"{k}={v}" for k, v in keys.items())]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1:
        launcher = (f"torchrun --standalone --nproc_per_node={world}" if world == local
                    else "torchrun <the same launcher options>")
    else:
        launcher = "python"
    return f"{launcher} " + " ".join(shlex.quote(w) for w in words)
