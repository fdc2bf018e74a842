"""Pretrain a topographic GPT-2 (TopoLM): task cross-entropy + alpha * spatial loss per site.

    python train.py train_shakespeare.yaml                      # CPU or one GPU
    torchrun --standalone --nproc_per_node=4 train.py train_gpt2.yaml batch_size=48 wandb_log=False

The first argument names a preset (a bare name is looked up in config/); `key=value` pairs
override it. Every key is a field of `TrainConfig` below; unknown keys and wrong types are refused.

Exact resume: the model, optimizer, scaler, iteration and every random stream (batch sampling,
neighborhood sampling, dropout; one set per rank) are in each checkpoint, so a run restarted
with `init_from=resume` continues as if it had never stopped. Evaluation draws from generators
of its own, re-seeded at each evaluation, so it never shifts the training streams.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from topolm.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, make_payload, tokenizer_for
from topolm.config import (DATA_DIR, POSITIONS_DIR, LoopConfig, UserError, cli_main, load_config, require,
                           resolve_path)
from topolm.distributed import Dist, print0, run_distributed
from topolm.files import open_tokens, remove_partial_writes, tokens_meta
from topolm.corpus import token_ids_used
from model import ARCH_KEYS, GPT, GPTConfig
from topolm.position_sets import load_positions
from positions import random_layout
from topolm.training import (JsonLog, Optimization, StopSignal, gather_objects, learning_rate_at, params_digest,
                             peak_flops, resolve_dtype, restore_streams, save_run_checkpoint, check_wandb,
                             start_wandb, stream_seed, accumulation_per_rank)


@dataclass
class TrainConfig(LoopConfig, GPTConfig):
    """train.py's keys: its own below, the model's from model.GPTConfig, the optimizer's, batches',
    logging and system keys from topolm.config.LoopConfig (each declared once, with its docstring, there)."""
    # ---- I/O
    out_dir: str = "out"
    """Folder that holds run folders; each run writes into out_dir/<run name>."""
    run_name: str = ""
    """Run folder name under out_dir; empty derives one from dataset, alpha and size."""
    eval_interval: int = 2000
    """Evaluate train/val losses every this many iterations (and at the end)."""
    eval_iters: int = 200
    """Batches per split and rank in each evaluation."""
    save_interval: int = 2000
    """Write a checkpoint every this many iterations (and at the end)."""
    always_save_checkpoint: bool = True
    """If False, a periodic checkpoint is written only when the last val loss is the best so far."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints of the run; 0 keeps all."""
    init_from: Literal["scratch", "resume"] = "scratch"
    """'scratch' starts a new run; 'resume' continues from the run folder's newest checkpoint."""
    eval_only: bool = False
    """Evaluate once and exit."""
    # ---- data
    dataset: str = "shakespeare"
    """Folder with train.bin/val.bin; a bare name means data/<name>."""
    output_vocab: Literal["full", "corpus"] = "full"
    """'full': the output softmax runs over all vocab_size ids (GPT-2, the paper; exports exactly to
    transformers' GPT2LMHeadModel). 'corpus': only over the ids that occur in the dataset's train.bin
    or val.bin (the checkpoint records them as the model's `output_ids`); every other id gets logit
    -inf in every forward, while the embedding keeps all vocab_size rows and GPT-2's ids. For a small
    corpus this saves most of the output layer's compute (the demo: 19,070 of 50,304 ids, about 2x
    faster steps), but such a model has no exact GPT2LMHeadModel export. (The model key n_output_ids
    follows from it: leave that 0.)"""
    # ---- topography
    position_dir: str = ""
    """Position set (init_pos.py output); a bare name means gpt2-positions/<name>; empty draws a random layout from `seed`."""
    # ---- length of the run
    max_iters: int = 600000
    """Optimizer steps in the whole run (0 with eval_only)."""

    def __post_init__(self):
        super().__post_init__()  # the model's, optimizer's, loop's and system keys
        for key in ("eval_interval", "eval_iters", "save_interval"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        for key in ("keep_last", "max_iters"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        require(self.radius >= 2 or self.alpha == 0,
                f"radius={self.radius} gives one-unit neighborhoods, which have no pairs to correlate; use "
                f"radius >= 2 (or alpha=0 for the control)")
        require(bool(self.dataset), "dataset= is empty; name a folder with train.bin and val.bin")
        require(self.run_name == "" or self.run_name.strip("./") != "",
                f"run_name='{self.run_name}' is not a folder name")
        require(self.n_output_ids == 0, f"n_output_ids={self.n_output_ids}: train.py derives it from the data; "
                                        f"set output_vocab=corpus instead")

    def model_config(self, n_output_ids: int = 0) -> GPTConfig:
        """The model's config; n_output_ids: the size of a restricted output vocabulary (0: all ids)."""
        keys = {f.name: getattr(self, f.name) for f in fields(GPTConfig)}
        return GPTConfig(**{**keys, "n_output_ids": n_output_ids})

    def run_dir(self) -> Path:
        name = self.run_name or (
            f"{Path(self.dataset).name}-{'topo' if self.alpha > 0 else 'control'}"
            f"-L{self.n_layer}-E{self.n_embed}-a{self.alpha:g}-r{self.radius}")
        return Path(self.out_dir) / name


# ----------------------------------------------------------------------------- data

class Batches:
    """Random windows of a uint16 token file, drawn from this rank's own generator."""

    def __init__(self, path: Path, cfg: TrainConfig, device: str):
        self.path, self.cfg, self.device = path, cfg, device
        self.n_tokens = len(open_tokens(path, cfg.block_size, cfg.vocab_size))

    def get(self, generator: torch.Generator):
        # Re-open the memmap each time: a long-lived np.memmap leaks memory (nanoGPT's note).
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        T = self.cfg.block_size
        ix = torch.randint(self.n_tokens - T, (self.cfg.batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix.tolist()])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


# ----------------------------------------------------------------------------- setup

def positions_for(cfg: TrainConfig) -> tuple[np.ndarray, str]:
    if not cfg.position_dir:
        return random_layout(2 * cfg.n_layer, cfg.n_embed, cfg.seed), f"random(seed={cfg.seed})"
    folder = resolve_path(cfg.position_dir, POSITIONS_DIR)
    try:
        coords, meta = load_positions(folder, cfg.n_layer, cfg.n_embed)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    return coords, f"{folder} ({meta.get('layout', '?')})"


def check_resume_config(ckpt: dict, cfg: TrainConfig, path: Path, n_output_ids: int) -> None:
    saved = ckpt["model_config"]
    wanted = asdict(cfg.model_config(n_output_ids))
    diff = [f"{k}={saved.get(k)} in checkpoint vs {wanted[k]} now" for k in ARCH_KEYS if saved.get(k) != wanted[k]]
    if diff:
        raise UserError(f"checkpoint {path} was made for another architecture: {'; '.join(diff)}; set these keys "
                        f"as in the checkpoint, or start a new run with another run_name")


def evaluate(model, raw_model: GPT, batches: dict[str, Batches], cfg: TrainConfig, d: Dist, ctx) -> dict:
    """Per split: the mean of each field of model.Losses (total as "loss", task, spatial, per-site SL
    as "sites") over eval_iters batches per rank, averaged over ranks. Its generators are re-seeded
    identically at every evaluation, so evaluations compare."""
    model.eval()
    out = {}
    for split, source in batches.items():
        g_batch = torch.Generator().manual_seed(cfg.seed + 7919 * (d.rank + 1))
        g_nbhd = torch.Generator(device=d.device).manual_seed(cfg.seed + 104729 * (d.rank + 1))
        sums = None
        with torch.no_grad():
            for _ in range(cfg.eval_iters):
                x, y = source.get(g_batch)
                with ctx:
                    _, losses = raw_model(x, y, units=raw_model.sample_units(g_nbhd), return_logits=False)
                values = {name: v.detach().float() for name, v in losses._asdict().items()}
                sums = values if sums is None else {k: sums[k] + values[k] for k in sums}
        if d.ddp:  # one collective for all fields
            flat = torch.cat([v.reshape(-1) for v in sums.values()])
            dist.all_reduce(flat)
            sums = {k: part.view_as(v) for (k, v), part in zip(sums.items(), flat.split([v.numel() for v in sums.values()]))}
        mean = {k: (v / (cfg.eval_iters * d.world_size)).tolist() for k, v in sums.items()}
        out[split] = {"loss": mean["total"], "task": mean["task"], "spatial": mean["spatial"], "sites": mean["per_site"]}
    model.train()
    return out


def main(argv: list[str]) -> None:
    run_distributed(load_config(TrainConfig, argv, default_file="train_shakespeare.yaml"), train)


def train(cfg: TrainConfig, d: Dist) -> None:
    accum_steps = accumulation_per_rank(cfg.gradient_accumulation_steps, d)
    dtype = resolve_dtype(cfg.dtype, d.device)
    run_dir = cfg.run_dir()
    data_dir = resolve_path(cfg.dataset, DATA_DIR)
    batches = {split: Batches(data_dir / f"{split}.bin", cfg, d.device) for split in ("train", "val")}
    output_ids = None
    if cfg.output_vocab == "corpus":
        output_ids = token_ids_used([source.path for source in batches.values()], cfg.vocab_size)

    # Everything that can refuse the run is checked before anything is written.
    ckpt = ckpt_file = None
    if cfg.init_from == "resume":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"init_from=resume but {run_dir} holds no checkpoint; use init_from=scratch to start "
                            f"the run (or name the run folder with out_dir/run_name)")
        ckpt_file = ckpts[-1]
        ckpt = load_checkpoint(ckpt_file)
        check_resume_config(ckpt, cfg, ckpt_file, 0 if output_ids is None else len(output_ids))
        coords, positions_source = None, ckpt["layout"]["source"]
    else:
        coords, positions_source = positions_for(cfg)
        if list_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints; use init_from=resume to continue it "
                            f"or another run_name/out_dir for a new run")
    tokenizer = tokenizer_for(cfg.vocab_size, tokens_meta(data_dir).get("tokenizer", "gpt2"))
    check_wandb(cfg)
    if cfg.eval_only and ckpt is None:
        print0("warning: eval_only=true with init_from=scratch evaluates a freshly initialised model; use "
               "init_from=resume to evaluate the run's newest checkpoint")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = GPT(cfg.model_config(0 if output_ids is None else len(output_ids)), coords, output_ids).to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {
        "batch": torch.Generator().manual_seed(stream_seed(cfg.seed, "batch", d.rank)),
        "nbhd": torch.Generator(device=d.device).manual_seed(stream_seed(cfg.seed, "nbhd", d.rank)),
    }
    torch.manual_seed(stream_seed(cfg.seed, "dropout", d.rank))  # dropout differs per rank
    iter_num, best_val_loss, wandb_id = 0, float("inf"), None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt)
        iter_num, best_val_loss, wandb_id = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("wandb_id")
        restore_streams(ckpt, generators, d, cfg.seed, "the checkpoint")
        del ckpt
    start_iter = iter_num
    model = opt.wrap()

    fresh = ckpt_file is None  # a new run: a log left by an earlier run without checkpoints is replaced
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(run_dir)
        if fresh and (run_dir / "log.jsonl").exists():
            print0(f"note: {run_dir / 'log.jsonl'} of an earlier run that saved no checkpoint is replaced")
    log = JsonLog(run_dir / "log.jsonl", d.is_main, fresh=fresh)
    tokens_per_iter = accum_steps * d.world_size * cfg.batch_size * cfg.block_size
    print0(f"run folder: {run_dir}")
    print0(f"device {d.device} x {d.world_size} rank(s), dtype {dtype}, {raw_model.get_num_params() / 1e6:.2f}M parameters, "
           f"positions from {positions_source}")
    print0(f"tokens per iteration: {tokens_per_iter:,} ({accum_steps} micro-steps x {d.world_size} ranks x "
           f"{cfg.batch_size} x {cfg.block_size})")
    log.write(event="start" if cfg.init_from == "scratch" else "resume", iter=iter_num, world_size=d.world_size,
              config=asdict(cfg))
    wandb_run = start_wandb(cfg, run_dir, name=cfg.wandb_run_name or run_dir.name, run_id=wandb_id) if d.is_main else None
    wandb_id = wandb_run.id if wandb_run else wandb_id

    def save(it: int) -> None:
        payload = make_payload(raw_model, kind="pretrain", config=asdict(cfg), iter_num=it, tokenizer=tokenizer,
                               layout_source=positions_source, **opt.state_dict(), best_val_loss=best_val_loss,
                               wandb_id=wandb_id)
        save_run_checkpoint(checkpoint_path(run_dir, it), payload, generators, d)
        if d.is_main and cfg.keep_last:
            for old in list_checkpoints(run_dir)[:-cfg.keep_last]:
                old.unlink()
        print0(f"saved checkpoint {checkpoint_path(run_dir, it)}")

    def run_eval(it: int) -> bool:
        """Evaluate, log, and say whether the validation loss is the best so far."""
        nonlocal best_val_loss
        res = evaluate(model, raw_model, batches, cfg, d, opt.ctx)
        improved = res["val"]["loss"] < best_val_loss
        best_val_loss = min(best_val_loss, res["val"]["loss"])
        print0(f"step {it}: train loss {res['train']['loss']:.4f} (task {res['train']['task']:.4f}, spatial "
               f"{res['train']['spatial']:.4f}), val loss {res['val']['loss']:.4f} (task {res['val']['task']:.4f}, "
               f"spatial {res['val']['spatial']:.4f})")
        log.write(event="eval", iter=it, train=res["train"], val=res["val"], lr=learning_rate_at(it, cfg))
        if wandb_run:
            wandb_run.log({"iter": it, **{f"{split}/{k}": res[split][k] for split in ("train", "val")
                                          for k in ("loss", "task", "spatial")},
                           **{f"val/sl/{n}": v for n, v in zip(raw_model.site_names, res["val"]["sites"])}}, step=it)
        return improved

    if cfg.eval_only:
        run_eval(iter_num)
        return

    stop = StopSignal()
    checks = {"task": "task", "sites": [f"spatial site {n}" for n in raw_model.site_names]}
    last_improved = True
    t0 = time.time()
    running_mfu = -1.0
    peak = peak_flops(d.device)

    def micro_step(model):
        x, y = batches["train"].get(generators["batch"])
        _, losses = model(x, y, units=raw_model.sample_units(generators["nbhd"]), return_logits=False)
        return losses.total, {"task": losses.task, "spatial": losses.spatial, "sites": losses.per_site}

    try:
        while iter_num < cfg.max_iters:
            if iter_num % cfg.eval_interval == 0:
                last_improved = run_eval(iter_num)
            if iter_num % cfg.save_interval == 0 and iter_num != start_iter:
                if cfg.always_save_checkpoint or last_improved:
                    save(iter_num)

            lr = learning_rate_at(iter_num, cfg)
            step = opt.step(iter_num, lr, accum_steps, micro_step, checks, stop.requested)
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            iter_num += 1
            if (iter_num - 1) % cfg.log_interval == 0:
                task, spatial = step.stats["task"], step.stats["spatial"]
                mfu_text = ""
                if peak and iter_num - start_iter > 5:
                    mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak)
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                    mfu_text = f", mfu {running_mfu * 100:.1f}%"
                print0(f"iter {iter_num - 1}: loss {task + spatial:.4f} (task {task:.4f}, spatial {spatial:.4f}), "
                       f"{dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s{mfu_text}"
                       + (" (step skipped)" if step.skipped else ""))
                log.write(event="train", iter=iter_num - 1, loss=task + spatial, task=task, spatial=spatial,
                          sites=step.stats["sites"], lr=lr, grad_norm=step.grad_norm, skipped=step.skipped,
                          loss_scale=step.loss_scale, dt=dt)
                if wandb_run:
                    wandb_run.log({"iter": iter_num - 1, "train/step_loss": task + spatial, "train/step_task": task,
                                   "train/step_spatial": spatial, "lr": lr}, step=iter_num - 1)
            if step.stop:
                print0(f"stop requested: saving a checkpoint at iteration {iter_num} and exiting")
                save(iter_num)
                log.write(event="stopped", iter=iter_num)
                return

        run_eval(iter_num)
        if iter_num != start_iter:
            save(iter_num)
        digests = gather_objects(params_digest(raw_model), d)
        log.write(event="end", iter=iter_num, param_sha256=digests)
        if d.ddp and len(set(digests)) != 1:
            raise UserError("ranks ended with different weights")
    finally:
        stop.restore()
        if wandb_run:
            wandb_run.finish()


if __name__ == "__main__":
    cli_main(main)
