"""Measure what this code costs on this machine: spatial loss, train step, swap search, data prep, and the
topography train.py measures at an evaluation.

    python bench.py                       # everything; on 2 CPU cores about 20 minutes, most of it the
                                          # 30 pairs of paper-width train steps (pairs=N for fewer)
    python bench.py only=spatial reps=20  # one part; json=bench.json also writes the figures

Each figure is the median (min-max) over `reps` timed runs after `warmup` untimed ones.
Nothing here is a test: the targets are printed beside the figures for a person to read.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from topolm.config import REPO, DeviceKey, LoopConfig, cli_main, load_config, one_of, require, resolve_device
from topolm.distributed import Dist
from topolm.files import atomic_write, require_json_target
from topolm.tokenizer import gpt2_encoding
from model import GPT, GPTConfig
from topolm.training import Optimization, peak_flops
from topolm.swap import swap_optimize, unit_correlations
from positions import CorticalSheet, random_layout


@dataclass
class BenchConfig(DeviceKey):
    """bench.py's keys: its own below; device from topolm.config.DeviceKey."""
    only: str = "all"
    """'all', 'spatial', 'step', 'swap', 'data' or 'topography'."""
    reps: int = 5
    """Timed repetitions per figure."""
    warmup: int = 2
    """Untimed repetitions before timing."""
    pairs: int = 30
    """Train step figure: timed topo/control step pairs per width, alternating which runs first."""
    widths: str = "small,paper"
    """Train step figure: the model widths to time, comma-separated ('small' 4 x 256, 'paper' 12 x 784)."""
    compile: bool = False
    """Also time the train step with torch.compile (on CUDA both are always timed)."""
    json: str = ""
    """Write all figures to this JSON file (a folder, a value ending in / or an existing one: bench.json inside it)."""
    data_mb: int = 32
    """Size of the local corpus for the data-preparation figure."""

    def __post_init__(self):
        super().__post_init__()
        one_of(self.only, "only", ("all", "spatial", "step", "swap", "data", "topography"))
        require(self.reps >= 1 and self.pairs >= 1 and self.warmup >= 0, "reps and pairs must be >= 1, warmup >= 0")
        for width in self.widths.split(","):
            one_of(width, "widths", tuple(STEP_SIZES))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int, device: str) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def fmt(t: dict) -> str:
    return f"{t['median_ms']:8.1f} ms ({t['min_ms']:.1f}-{t['max_ms']:.1f})"


# ----------------------------------------------------------------------------- 1. spatial loss

def spatial_loss_step(n_sites: int, n_embed: int, radius: int, rows: int, k: int, device: str):
    """(loss, fwd+bwd) closures over random site activations: the spatial loss as the model runs it."""
    sheet = CorticalSheet(n_sites, n_embed, radius, random_layout(n_sites, n_embed, 0)).to(device)
    acts = [torch.randn(rows, n_embed, device=device, requires_grad=True) for _ in range(n_sites)]
    g = torch.Generator(device=device).manual_seed(0)

    def loss_only():
        units = sheet.sample_units(k, g)
        grams = torch.stack([sheet.site_gram(a, units[i], k) for i, a in enumerate(acts)])
        return sheet.loss(grams, "mean").sum()

    return loss_only, lambda: loss_only().backward()


def bench_spatial(cfg: BenchConfig, device: str) -> dict:
    n_sites, n_embed, radius, rows = 24, 784, 5, 2048
    out = {}
    for k in (5, 20):
        loss_only, fwd_bwd = spatial_loss_step(n_sites, n_embed, radius, rows, k, device)
        t = timed(fwd_bwd, cfg.reps, cfg.warmup, device)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss_only()
        top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        out[f"k={k}"] = {**t, "ops_forward": len(top_level)}
        print(f"spatial loss fwd+bwd, 24 sites x {k} neighborhoods x 81 units, {rows} rows: {fmt(t)}; "
              f"{len(top_level)} operator calls in the forward")
    x = torch.randn(n_sites * 5, rows, 81, device=device)
    s = torch.randn(n_sites * 5, 81, 81, device=device)
    t = timed(lambda: (x.transpose(1, 2) @ x, x @ s), cfg.reps, cfg.warmup, device)
    out["gram_floor"] = t
    print(f"  floor (the centred Gram products alone, forward and backward): {fmt(t)}; target for k=5: <= 100 ms on 2 CPU cores "
          f"(research code: 308 ms)")
    return out


# ----------------------------------------------------------------------------- 2. train step

STEP_SIZES = {
    "small": dict(n_layer=4, n_embed=256, n_head=8, radius=5),
    "paper": dict(n_layer=12, n_embed=784, n_head=16, radius=5),
}


def _step_fn(size: str, alpha: float, device: str, compile_model: bool, batch: int = 8, block: int = 256):
    """A model and one call of train.py's own optimizer step on a fixed batch: training.Optimization
    (autocast, backward, unscale, clip, the non-finite check with its host sync, AdamW), with the
    micro-step returning the same named statistics as train.py's."""
    torch.manual_seed(0)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    cfg = GPTConfig(block_size=block, alpha=alpha, **STEP_SIZES[size])
    loop = LoopConfig(batch_size=batch, compile=compile_model, device=device, dtype=dtype)  # pretraining's AdamW
    model = GPT(cfg, random_layout(cfg.n_sites, cfg.n_embed, 0)).to(device)
    opt = Optimization(model, loop, Dist(0, 0, 1, device, False), dtype)
    opt.wrap()  # compile as train.py does; the step runs opt.model
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, block), device=device)
    checks = {"task": "task", "sites": [f"spatial site {n}" for n in model.site_names]}

    def micro_step(m):
        _, losses = m(x, x, units=model.sample_units(g))
        return losses.total, {"task": losses.task, "spatial": losses.spatial, "sites": losses.per_site}

    def step():
        opt.step(0, loop.learning_rate, 1, micro_step, checks, False)
    return model, step


def _peak_memory_child(size: str, alpha: float, device: str) -> None:
    _, step = _step_fn(size, alpha, device, False)
    for _ in range(2):
        step()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak}))


def peak_memory(size: str, alpha: float, device: str) -> float:
    """Peak memory of two train steps in a fresh process (CPU: max RSS; CUDA: max allocated)."""
    code = f"import bench; bench._peak_memory_child({size!r}, {alpha!r}, {device!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); every value for fewer than two."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bench_step(cfg: BenchConfig, device: str) -> dict:
    """Train step (forward, backward, AdamW) of the topographic model and its control at two widths,
    with_resid=False (the paper's). The two run in alternating pairs (AB, BA, AB, ...) in one
    process, and the figure is the median over pairs of the ratio topo / control within a pair,
    with its interquartile range: drifts in machine speed hit both members of a pair alike."""
    out = {}
    compile_modes = [False, True] if (device.startswith("cuda") or cfg.compile) else [False]
    for compile_model in compile_modes:
        for size in cfg.widths.split(","):
            topo_model, topo = _step_fn(size, 2.5, device, compile_model)
            _, control = _step_fn(size, 0.0, device, compile_model)
            for _ in range(max(1, cfg.warmup)):
                topo(), control()
            times = {"topo": [], "control": []}
            pair = (("topo", topo), ("control", control))
            for rep in range(cfg.pairs):
                for name, fn in (pair if rep % 2 == 0 else pair[::-1]):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            entry = {k: {"median_ms": 1e3 * med[k], "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
                     for k, v in times.items()}
            ratios = [t / c for t, c in zip(times["topo"], times["control"])]
            q1, q2, q3 = quartiles(ratios)
            entry.update(pairs=cfg.pairs, ratio_paired_median=q2, ratio_paired_iqr=[q1, q3], ratios=ratios)
            # The added work alone, timed in isolation (many short runs, so far less noisy than the steps).
            c = STEP_SIZES[size]
            _, spatial = spatial_loss_step(2 * c["n_layer"], c["n_embed"], c["radius"], 8 * 256, 5, device)
            entry["spatial_ms"] = timed(spatial, cfg.reps, cfg.warmup, device)["median_ms"]
            entry["ratio_by_added_work"] = 1 + entry["spatial_ms"] / entry["control"]["median_ms"]
            tag = f"{size}{' compiled' if compile_model else ''}"
            if not compile_model:
                entry["peak_mb"] = {"topo": peak_memory(size, 2.5, device), "control": peak_memory(size, 0.0, device)}
            peak = peak_flops(device)
            if peak:
                entry["mfu"] = {k: topo_model.estimate_mfu(8 * 256, med[k], peak) for k in med}
            out[tag] = entry
            mem = entry.get("peak_mb")
            print(f"train step {tag:<15} ({STEP_SIZES[size]['n_layer']} layers, n_embed {STEP_SIZES[size]['n_embed']}, "
                  f"batch 8 x 256, with_resid=False): topo {fmt(entry['topo'])}, control {fmt(entry['control'])}; "
                  f"topo/control paired ratio, median over {cfg.pairs} pairs {q2:.3f} (interquartile range "
                  f"{q1:.3f}-{q3:.3f}); by the added spatial work ({entry['spatial_ms']:.0f} ms) "
                  f"{entry['ratio_by_added_work']:.3f} (target <= 1.02)"
                  + (f"; peak memory topo {mem['topo']:.0f} MB, control {mem['control']:.0f} MB" if mem else "")
                  + (f"; MFU topo {entry['mfu']['topo'] * 100:.1f}%, control {entry['mfu']['control'] * 100:.1f}%"
                     if "mfu" in entry else ""), flush=True)
    return out


# ----------------------------------------------------------------------------- 3. swap search

def bench_swap(cfg: BenchConfig) -> dict:
    out = {}
    cases = {
        "research README defaults (24 sites, radius 10, 50 x 50)": dict(n_sites=24, radius=10, n=50, visit_all=False),
        "research init_pos.yaml (32 sites, radius 5, all 400 x 50)": dict(n_sites=32, radius=5, n=400, visit_all=True),
    }
    for name, c in cases.items():
        acts = torch.randn(c["n_sites"], 2048, 784)
        acts[:, :, 1::2] += acts[:, :, ::2]
        corr = unit_correlations(acts)
        coords = random_layout(c["n_sites"], 784, 0)
        t = timed(lambda: swap_optimize(coords, corr, c["radius"], c["n"], 50, c["visit_all"], 0),
                  max(1, cfg.reps // 2), min(1, cfg.warmup), "cpu")
        out[name] = t
        print(f"swap search, {name}: {fmt(t)}")
    print("  targets on 2 CPU cores: research README defaults a few seconds; research config < 7 s (research code: ~224 s)")
    return out


# ----------------------------------------------------------------------------- 4. data prep

def bench_data(cfg: BenchConfig) -> dict:
    from topolm.corpus import shakespeare_plays, tokenize_to_files
    plays = [text for _, text in shakespeare_plays()]
    docs, size = [], 0
    while size < cfg.data_mb * 2**20:  # many document-sized pieces, as in FineWeb
        for play in plays:
            for i in range(0, len(play), 4000):
                docs.append(play[i:i + 4000])
                size += len(docs[-1])
    enc = gpt2_encoding()
    from datasets import Dataset
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        ds = Dataset.from_dict({"text": docs})
        singles, pipelines = [], []
        for _ in range(min(3, cfg.reps)):  # alternate, so drifts in machine speed hit both alike
            t0 = time.perf_counter()
            n_tokens = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
            singles.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tokenize_to_files(ds, Path(tmp), workers, 0.0005, 42, progress=False)
            pipelines.append(time.perf_counter() - t0)
        single, pipeline = statistics.median(singles), statistics.median(pipelines)
        src = Path(tmp) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        cmd = [sys.executable, "data/fineweb/prepare.py", "--files", str(src), "--out_dir", tmp,
               "--num_proc", str(workers)]
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
        whole = time.perf_counter() - t0
    out = {"tokens": n_tokens, "single_stream_tok_s": n_tokens / single, "prepare_tok_s": n_tokens / pipeline,
           "speedup": single / pipeline, "end_to_end_tok_s": n_tokens / whole, "end_to_end_speedup": single / whole,
           "workers": workers}
    print(f"data prep, {size / 2**20:.0f} MB / {n_tokens:,} tokens: single encode_ordinary stream "
          f"{out['single_stream_tok_s']:,.0f} tok/s; prepare.py tokenize-and-write with {workers} workers "
          f"{out['prepare_tok_s']:,.0f} tok/s = {out['speedup']:.2f}x (target >= 1.7x on 2 cores); "
          f"whole command incl. Python start and loading the jsonl: {out['end_to_end_speedup']:.2f}x")
    return out


# ----------------------------------------------------------------------------- 5. topography at an evaluation

def bench_topography(cfg: BenchConfig, device: str) -> dict:
    """train.py's topography at one evaluation of the demo (config/train_shakespeare.yaml: 4 layers, 12 x 12
    sheets, the corpus softmax of 19,070 ids, eval_iters 40 of 4 x 128 per split) against that evaluation:
    the scalars (topolm.topography.Measurer.measure, its default keys) and the maps' image, each timed
    apart. Tokens are drawn at random from the output ids: the cost does not depend on what they say."""
    import numpy as np

    from topolm.config import load_config as preset
    from topolm.topography import Measurer, TopographyKeys, draw_maps
    from topolm.figures import save_figure

    demo = preset(_TrainLike, ["train_shakespeare.yaml"], default_file="train_shakespeare.yaml")
    n_ids = 19_070
    output_ids = np.sort(np.random.default_rng(0).choice(demo.vocab_size, n_ids, replace=False))
    keys = {f: getattr(demo, f) for f in GPTConfig.__dataclass_fields__ if hasattr(demo, f)}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**keys, "n_output_ids": n_ids}), random_layout(2 * demo.n_layer, demo.n_embed, 0),
                output_ids).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.as_tensor(output_ids)

    def batch():
        x = ids[torch.randint(n_ids, (demo.batch_size, demo.block_size + 1), generator=g)].to(device)
        return x[:, :-1], x[:, 1:]

    def evaluation():  # train.py's evaluate: eval_iters batches of each split, no gradients
        model.eval()
        nbhd = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for _ in range(2 * demo.eval_iters):
                x, y = batch()
                model(x, y, units=model.sample_units(nbhd), return_logits=False)
        model.train()

    with tempfile.TemporaryDirectory() as tmp:
        val = Path(tmp) / "val.bin"
        ids.numpy()[np.random.default_rng(1).integers(n_ids, size=300_000)].astype(np.uint16).tofile(val)
        keys = TopographyKeys()
        measurer = Measurer(keys, val, demo.block_size, gpt2_ids=True)
        record = {}

        def scalars():
            record.update(measurer.measure(model)[0])

        def image():
            model.eval()
            arrays = measurer.measure(model)[1]
            save_figure(draw_maps(model, arrays, "bench"), Path(tmp) / "maps.png")

        # alternating, so that the load of a shared machine hits both alike; the figure is the median ratio
        evaluations, scalar_times, ratios = [], [], []
        for rep in range(cfg.warmup + cfg.reps):
            t0 = time.perf_counter()
            evaluation()
            t1 = time.perf_counter()
            scalars()
            t2 = time.perf_counter()
            if rep >= cfg.warmup:
                evaluations.append(t1 - t0)
                scalar_times.append(t2 - t1)
                ratios.append((t2 - t1) / (t1 - t0))
        image_times = []
        for _ in range(cfg.reps):
            t0 = time.perf_counter()
            image()
            image_times.append(time.perf_counter() - t0)
        out = {"evaluation_s": statistics.median(evaluations), "scalars_s": statistics.median(scalar_times),
               "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "image_s": statistics.median(image_times) - statistics.median(scalar_times),
               "heldout_tokens": keys.topography_heldout_tokens, "stimuli": keys.topography_stimuli,
               "null_shuffles": keys.topography_null_shuffles}
    print(f"topography at a demo evaluation: evaluation (2 x {demo.eval_iters} batches of {demo.batch_size} x "
          f"{demo.block_size}) {out['evaluation_s']:.2f} s; the scalars {out['scalars_s']:.2f} s: "
          f"{100 * out['ratio']:.1f}% of it (median over {cfg.reps} alternating pairs, {100 * min(ratios):.1f}-"
          f"{100 * max(ratios):.1f}%; target <= 10%); the maps' image adds {out['image_s']:.2f} s")
    return out


@dataclass
class _TrainLike(LoopConfig, GPTConfig):
    """The demo preset's model and loop keys as bench_topography reads them (train.py's other keys ignored)."""
    eval_iters: int = 200
    out_dir: str = ""
    run_name: str = ""
    eval_interval: int = 0
    save_interval: int = 0
    dataset: str = ""
    output_vocab: str = ""
    position_dir: str = ""
    max_iters: int = 0
    topography_image_interval: int = 0


def main(argv: list[str]) -> None:
    cfg: BenchConfig = load_config(BenchConfig, argv)
    device = resolve_device(cfg.device)
    target = require_json_target(cfg.json, "bench.json")
    print(f"bench on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {"device": device, "config": asdict(cfg)}
    parts = {"spatial": lambda: bench_spatial(cfg, device), "step": lambda: bench_step(cfg, device),
             "swap": lambda: bench_swap(cfg), "data": lambda: bench_data(cfg),
             "topography": lambda: bench_topography(cfg, device)}
    for name, fn in parts.items():
        if cfg.only in ("all", name):
            results[name] = fn()
    if target is not None:
        atomic_write(target, json.dumps(results, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    cli_main(main)
