"""Check the paper preset on one GPU in a few minutes: torch.compile on and off, bf16, the paper's batch.

    python gpu_check.py                          # one GPU: 12 x 784, 16 heads, 48 x 1024 tokens per step
    python gpu_check.py json=gpu_check.json      # also write the figures
    python gpu_check.py size=tiny device=cpu     # CPU smoke run of the same code (a test runs it)

Synthetic tokens (uniform over the vocabulary), no data files, no wandb, nothing written except
`json`. For each of compile off / on it builds the topographic model (alpha 2.5) and its control
(alpha 0) from the same seed, then:
1. trains `compare_steps` steps of the topographic model and compares the logged losses (task and
   spatial) of the compiled model with the eager one, step by step (same weights, batches and
   neighborhoods; bf16 rounding differs between fused and unfused kernels, hence `loss_rtol`);
2. times `pairs` alternating topo/control steps (after `warmup` of each) and reports ms/step,
   tokens/s, MFU (against the GPU's dense bf16 peak), peak memory and the median paired
   topo/control step ratio;
3. names the attention kernel the default path picks (profiler: the aten SDPA operator and the
   device kernels it launched).
A step is train.py's own optimizer step (topolm.training.Optimization: forward + backward under
autocast, gradient clipping, the non-finite check, AdamW) over `batch_size` sequences, split into
micro-batches of `micro_batch` (0: all at once; halved automatically on out-of-memory).
Exit status 1 if compiled and eager losses disagree beyond `loss_rtol`.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

from topolm.config import DeviceKey, LoopConfig, cli_main, load_config, one_of, require, resolve_device
from topolm.distributed import Dist
from topolm.files import atomic_write, require_json_target
from model import GPT, GPTConfig
from topolm.training import Optimization, peak_flops
from positions import random_layout

SIZES = {
    "paper": dict(n_layer=12, n_head=16, n_embed=784, radius=5, neighborhoods_per_batch=5, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=2, n_embed=36, radius=2, neighborhoods_per_batch=3, vocab_size=64),
}
ALPHA = 2.5  # the paper's


@dataclass
class GpuCheckConfig(DeviceKey):
    """gpu_check.py's keys: its own below; device from topolm.config.DeviceKey."""
    size: str = "paper"
    """'paper' (12 layers x 784 units, 16 heads) or 'tiny' (2 x 36, for a CPU smoke run)."""
    batch_size: int = 48
    """Sequences per optimizer step (the paper's per-GPU batch)."""
    block_size: int = 1024
    """Tokens per sequence."""
    micro_batch: int = 0
    """Sequences per forward/backward (gradient accumulation up to batch_size); 0: batch_size."""
    compare_steps: int = 3
    """Training steps whose losses are compared, compiled vs eager."""
    warmup: int = 2
    """Untimed steps of each variant before timing (after the compare steps, which also compile)."""
    pairs: int = 6
    """Timed topo/control step pairs per compile setting, in alternating order."""
    dtype: str = "bfloat16"
    """Autocast dtype: 'bfloat16', 'float16' or 'float32'."""
    loss_rtol: float = 0.02
    """Largest relative difference of a compared loss, compiled vs eager."""
    json: str = ""
    """Write all figures to this JSON file (a folder, a value ending in / or an existing one: gpu_check.json inside
    it)."""

    def __post_init__(self):
        super().__post_init__()
        one_of(self.size, "size", tuple(SIZES))
        one_of(self.dtype, "dtype", ("bfloat16", "float16", "float32"))
        for key in ("batch_size", "block_size", "compare_steps", "pairs"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        require(self.warmup >= 0 and self.micro_batch >= 0, "warmup and micro_batch must be >= 0")
        require(self.micro_batch <= self.batch_size, f"micro_batch={self.micro_batch} exceeds batch_size")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Variant:
    """One model (topo or control, eager or compiled) and train.py's optimizer step for it
    (topolm.training.Optimization: autocast, backward, unscale, clip, the non-finite check, AdamW)."""

    def __init__(self, cfg: GpuCheckConfig, device: str, alpha: float, compiled: bool):
        self.cfg, self.device = cfg, device
        torch.manual_seed(0)
        gcfg = GPTConfig(block_size=cfg.block_size, alpha=alpha, dropout=0.0, **SIZES[cfg.size])
        self.model = GPT(gcfg, random_layout(gcfg.n_sites, gcfg.n_embed, 0)).to(device)
        # pretraining's AdamW (weight decay 0.1, lr 6e-4, betas 0.9 / 0.95) and grad clip 1.0
        self.loop = LoopConfig(batch_size=cfg.batch_size, compile=compiled, device=device, dtype=cfg.dtype)
        self.opt = Optimization(self.model, self.loop, Dist(0, 0, 1, device, False), cfg.dtype)
        self.opt.wrap()
        self.checks = {"task": "task", "sites": [f"spatial site {n}" for n in self.model.site_names]}

    def batch(self, step: int):
        """The same synthetic tokens and neighborhoods for every variant at a given step."""
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.model.config.vocab_size, (self.cfg.batch_size, self.cfg.block_size + 1), generator=g)
        units = self.model.sample_units(torch.Generator(device=self.device).manual_seed(step))
        return x[:, :-1].contiguous().to(self.device), x[:, 1:].contiguous().to(self.device), units

    def step(self, step: int, micro: int) -> tuple[float, float]:
        """One optimizer step over micro-batches of `micro` sequences; returns (task, spatial) losses."""
        x, y, units = self.batch(step)
        n = -(-self.cfg.batch_size // micro)
        chunks = iter(range(n))
        micro_step = partial(self.micro_step, x, y, units, micro, n, chunks)
        result = self.opt.step(step, self.loop.learning_rate, n, micro_step, self.checks, False)
        return result.stats["task"], result.stats["spatial"]

    def micro_step(self, x, y, units, micro: int, n: int, chunks, model) -> tuple[torch.Tensor, dict]:
        """The next of `n` micro-batches of `micro` sequences, weighted by its share of the batch (the
        optimizer step divides by n; a last, shorter micro-batch counts for its length)."""
        i = next(chunks)
        xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
        _, losses = model(xs, ys, units=units)
        weight = len(xs) * n / self.cfg.batch_size
        return losses.total * weight, {"task": losses.task * weight, "spatial": losses.spatial * weight,
                                       "sites": losses.per_site * weight}


def run_step(variant: Variant, step: int, state: dict) -> tuple[float, float]:
    """A step, halving the micro-batch on out-of-memory (the step is redone from the same state:
    an out-of-memory error is raised before the optimizer runs)."""
    while True:
        try:
            return variant.step(step, state["micro"])
        except torch.OutOfMemoryError:
            if state["micro"] == 1:
                raise
            variant.opt.optimizer.zero_grad(set_to_none=True)
            state["micro"] = max(1, state["micro"] // 2)
            torch.cuda.empty_cache()
            print(f"out of memory: micro-batch now {state['micro']} (gradient accumulation)", flush=True)


def attention_kernels(variant: Variant, state: dict) -> dict:
    """The SDPA operator and the device kernels one eager forward + backward runs."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device.startswith("cuda") else [])
    x, y, units = variant.batch(0)
    micro = state["micro"]
    with profile(activities=activities) as prof:
        with variant.opt.ctx:
            _, losses = variant.model(x[:micro], y[:micro], units=units)
        losses.total.backward()
        sync(variant.device)
    variant.opt.optimizer.zero_grad(set_to_none=True)
    events = prof.events()
    ops = sorted({e.name for e in events if e.name.startswith(("aten::_scaled_dot_product", "aten::_flash",
                                                               "aten::_efficient_attention", "aten::_cudnn_attention"))})
    words = ("flash", "fmha", "attention", "attn", "softmax", "cudnn")
    kernels = sorted({e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and any(w in e.name.lower() for w in words)})
    return {"sdpa_ops": ops, "device_kernels": kernels[:20],
            "head_dim": variant.model.config.n_embed // variant.model.config.n_head}


def main(argv: list[str]) -> None:
    cfg: GpuCheckConfig = load_config(GpuCheckConfig, argv)
    device = resolve_device(cfg.device)
    target = require_json_target(cfg.json, "gpu_check.json")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}, size {cfg.size}, dtype {cfg.dtype}, "
          f"batch {cfg.batch_size} x {cfg.block_size}", flush=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = {"micro": cfg.micro_batch or cfg.batch_size}
    tokens = cfg.batch_size * cfg.block_size
    peak = peak_flops(device)
    results = {"device": device, "device_name": name, "torch": torch.__version__, "config": asdict(cfg)}
    losses = {}
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        t0 = time.perf_counter()
        topo, control = Variant(cfg, device, ALPHA, compiled), Variant(cfg, device, 0.0, compiled)
        losses[tag] = [run_step(topo, s, state) for s in range(cfg.compare_steps)]
        first = time.perf_counter() - t0
        if not compiled:
            results["attention"] = attention_kernels(topo, state)
            print(f"attention at head dim {results['attention']['head_dim']}: {', '.join(results['attention']['sdpa_ops'])}"
                  f"; kernels: {', '.join(results['attention']['device_kernels']) or '-'}", flush=True)
        step = cfg.compare_steps
        for _ in range(cfg.warmup):
            run_step(topo, step, state), run_step(control, step, state)
            step += 1
        times = {"topo": [], "control": []}
        memory = {}
        for pair in range(cfg.pairs):
            order = (("topo", topo), ("control", control)) if pair % 2 == 0 else (("control", control), ("topo", topo))
            for kind, variant in order:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t1 = time.perf_counter()
                run_step(variant, step, state)
                sync(device)
                times[kind].append(time.perf_counter() - t1)
                if device.startswith("cuda"):
                    memory[kind] = max(memory.get(kind, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            step += 1
        ratios = [a / b for a, b in zip(times["topo"], times["control"])]
        entry = {"first_steps_s": first, "micro_batch": state["micro"],
                 "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        for kind in times:
            dt = statistics.median(times[kind])
            entry[kind] = {"ms_per_step": 1e3 * dt, "tokens_per_s": tokens / dt,
                           "mfu": topo.model.estimate_mfu(tokens, dt, peak) if peak else None,
                           "peak_memory_gib": memory.get(kind)}
        results[tag] = entry
        print(f"{tag}: {cfg.compare_steps} compare steps (incl. compile) {first:.1f} s; micro-batch {state['micro']}; "
              + "; ".join(f"{k} {entry[k]['ms_per_step']:.1f} ms/step, {entry[k]['tokens_per_s']:,.0f} tok/s"
                          + (f", MFU {100 * entry[k]['mfu']:.1f}%" if entry[k]["mfu"] else "")
                          + (f", peak {entry[k]['peak_memory_gib']:.1f} GiB" if entry[k]["peak_memory_gib"] else "")
                          for k in ("topo", "control"))
              + f"; topo/control median paired ratio {entry['ratio_median']:.3f} "
                f"({entry['ratio_min']:.3f}-{entry['ratio_max']:.3f} over {cfg.pairs} pairs)", flush=True)
        del topo, control
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    diffs = [max(abs(c - e) / max(abs(e), 1e-12) for c, e in zip(lc, le))
             for lc, le in zip(losses["compiled"], losses["eager"])]
    results["losses"] = {"eager": losses["eager"], "compiled": losses["compiled"], "max_rel_diff_per_step": diffs}
    ok = max(diffs) <= cfg.loss_rtol
    results["losses_match"] = ok
    print("losses (task, spatial) per step, eager vs compiled: "
          + "; ".join(f"step {s}: ({e[0]:.4f}, {e[1]:.4f}) vs ({c[0]:.4f}, {c[1]:.4f})"
                      for s, (e, c) in enumerate(zip(losses["eager"], losses["compiled"])))
          + f"; largest relative difference {max(diffs):.2e} ({'ok' if ok else 'FAILED'}, tolerance {cfg.loss_rtol:g})",
          flush=True)
    if target is not None:
        atomic_write(target, json.dumps(results, indent=2) + "\n")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    cli_main(main)
