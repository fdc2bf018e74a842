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

import hashlib
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import (DATA_DIR, POSITIONS_DIR, Dist, SystemConfig, UserError, atomic_save, checkpoint_path, cleanup_distributed,
                    cli_main, list_checkpoints, load_checkpoint, load_config, one_of, open_tokens, print0, require,
                    resolve_path, setup_distributed)
from corpus import token_ids_used
from model import ARCH_KEYS, GPT, GPTConfig, configure_adamw
from positions import load_positions, random_layout


@dataclass
class TrainConfig(SystemConfig):
    # ---- I/O
    out_dir: str = "out"
    """Folder that holds run folders; each run writes into out_dir/<run name>."""
    run_name: str = ""
    """Run folder name under out_dir; empty derives one from dataset, alpha and size."""
    eval_interval: int = 2000
    """Evaluate train/val losses every this many iterations (and at the end)."""
    eval_iters: int = 200
    """Batches per split and rank in each evaluation."""
    log_interval: int = 1
    """Print and log the training loss every this many iterations."""
    save_interval: int = 2000
    """Write a checkpoint every this many iterations (and at the end)."""
    always_save_checkpoint: bool = True
    """If False, a periodic checkpoint is written only when the last val loss is the best so far."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints of the run; 0 keeps all."""
    init_from: str = "scratch"
    """'scratch' starts a new run; 'resume' continues from the run folder's newest checkpoint."""
    eval_only: bool = False
    """Evaluate once and exit."""
    # ---- wandb
    wandb_project: str = "topolm"
    """wandb project name."""
    wandb_run_name: str = ""
    """wandb run name; empty uses the run folder name."""
    # ---- data
    dataset: str = "shakespeare"
    """Folder with train.bin/val.bin; a bare name means data/<name>."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, in total over all ranks (must divide by the rank count)."""
    batch_size: int = 12
    """Sequences per micro-batch and rank."""
    block_size: int = 1024
    """Context length in tokens."""
    # ---- model
    n_layer: int = 12
    """Transformer blocks (two spatial sites each)."""
    n_head: int = 16
    """Attention heads; must divide n_embed."""
    n_embed: int = 784
    """Hidden units per site; a perfect square (28 x 28 for 784)."""
    dropout: float = 0.0
    """Dropout probability (0.0 for pretraining)."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers."""
    vocab_size: int = 50304
    """Vocabulary size; GPT-2's 50257 padded to a multiple of 64."""
    output_vocab: str = "full"
    """'full': the output softmax runs over all vocab_size ids (GPT-2, the paper; exports exactly to
    transformers' GPT2LMHeadModel). 'corpus': only over the ids that occur in the dataset's train.bin
    or val.bin (the checkpoint records them as the model's `output_ids`); every other id gets logit
    -inf in every forward, while the embedding keeps all vocab_size rows and GPT-2's ids. For a small
    corpus this saves most of the output layer's compute (the demo: 19,070 of 50,304 ids, about 2x
    faster steps), but such a model has no exact GPT2LMHeadModel export."""
    # ---- topography
    position_dir: str = ""
    """Position set (init_pos.py output); a bare name means gpt2-positions/<name>; empty draws a random layout from `seed`."""
    radius: int = 5
    """Neighborhood radius: a neighborhood is a (2r-1) x (2r-1) block of the grid."""
    neighborhoods_per_batch: int = 5
    """Neighborhoods sampled per site on every forward pass."""
    alpha: float = 2.5
    """Weight of each site's spatial loss; 0 trains the non-topographic control."""
    accum: str = "mean"
    """How a site combines its neighborhoods' losses: 'mean' or 'max'."""
    with_resid: bool = False
    """Site activation: False = sublayer output before the residual add; True = residual stream after it."""
    # ---- optimizer
    learning_rate: float = 6e-4
    """Peak learning rate."""
    max_iters: int = 600000
    """Optimizer steps in the whole run."""
    weight_decay: float = 1e-1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    decay_lr: bool = True
    """Linear warmup then cosine decay; False keeps learning_rate constant."""
    warmup_iters: int = 2000
    """Warmup steps."""
    lr_decay_iters: int = 600000
    """Step at which the cosine reaches min_lr."""
    min_lr: float = 6e-5
    """Final learning rate."""
    # ---- system: backend, device, dtype, compile, seed, nonfinite and wandb_log come from common.SystemConfig

    def __post_init__(self):
        for key in ("eval_interval", "eval_iters", "log_interval", "save_interval", "batch_size",
                    "gradient_accumulation_steps"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        for key in ("keep_last", "max_iters", "warmup_iters", "lr_decay_iters", "grad_clip", "learning_rate", "min_lr"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        one_of(self.init_from, "init_from", ("scratch", "resume"))
        one_of(self.output_vocab, "output_vocab", ("full", "corpus"))
        super().__post_init__()
        self.model_config()  # architecture checks (perfect square, heads, radius) live in GPTConfig

    def model_config(self, n_output_ids: int = 0) -> GPTConfig:
        return GPTConfig(n_output_ids=n_output_ids,
            block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
            n_embed=self.n_embed, dropout=self.dropout, bias=self.bias, radius=self.radius,
            neighborhoods_per_batch=self.neighborhoods_per_batch, alpha=self.alpha, accum=self.accum,
            with_resid=self.with_resid,
        )

    def run_dir(self) -> Path:
        name = self.run_name or (
            f"{Path(self.dataset).name}-{'topo' if self.alpha > 0 else 'control'}"
            f"-L{self.n_layer}-E{self.n_embed}-a{self.alpha:g}-r{self.radius}")
        return Path(self.out_dir) / name


# ----------------------------------------------------------------------------- pieces shared with finetune.py

def resolve_dtype(dtype: str, device: str) -> str:
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


def learning_rate_at(it: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: str) -> float | None:
    """The device's dense bf16 peak, for MFU; None where unknown (CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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


def gather_objects(obj, d: Dist) -> list:
    if not d.ddp:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class JsonLog:
    """Append-only log.jsonl in the run folder (rank 0 only); never truncated on resume."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to checkpoint and exit at the next iteration boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Optimization:
    """The optimizer step that train.py and finetune.py share.

    Owns AdamW, the fp16 grad scaler, autocast, torch.compile and the DDP wrapper. `step` runs the
    micro-batches of one optimizer step (gradients synchronised on the last one only), unscales,
    clips, and then does one small collective that tells every rank which logged quantity (if any)
    went non-finite and whether any rank was asked to stop, so that all ranks take the same branch.
    `cfg` needs the optimizer keys (learning_rate, weight_decay, beta1, beta2, grad_clip, nonfinite)
    and `compile`.
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

    def step(self, it: int, lr: float, accum_steps: int, micro_step, names: list[str | None],
             stop_requested: bool) -> tuple[list[float], float, bool, bool]:
        """One optimizer step. `micro_step(model)` runs one micro-batch forward under autocast and
        returns (loss to minimise, 1-D tensor of quantities to log); `names` names those quantities
        for the non-finite check (None: not checked). Returns (the quantities averaged over the
        micro-batches, gradient norm, whether the step was skipped, whether to stop)."""
        sums = None
        for micro in range(accum_steps):
            sync = nullcontext() if (not self.d.ddp or micro == accum_steps - 1) else self.model.no_sync()
            with sync:
                with self.ctx:
                    loss, stats = micro_step(self.model)
                self.scaler.scale(loss / accum_steps).backward()
            stats = stats.detach().float()
            sums = stats if sums is None else sums + stats
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        checked = [i for i, name in enumerate(names) if name is not None]
        finite = torch.cat([torch.isfinite(sums[checked]), torch.isfinite(grad_norm.reshape(1).to(sums.device))]).float()
        if self.dtype == "float16":
            finite[-1] = 1.0  # the scaler handles overflowing fp16 gradients itself
        flags = torch.cat([finite, torch.tensor([float(stop_requested)], device=sums.device)])
        if self.d.ddp:
            flags[:-1] = -flags[:-1]  # MIN over finite flags, MAX over the stop flag, in one MAX
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags[:-1] = -flags[:-1]
        flags = flags.tolist()
        bad = [name for name, ok in zip([names[i] for i in checked] + ["gradient norm"], flags[:-1]) if ok < 1]
        if bad and self.cfg.nonfinite == "stop":
            raise UserError(f"non-finite loss at iteration {it}: {', '.join(bad)}; the last good "
                            f"checkpoint is kept (set nonfinite=skip to skip such steps)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if bad:
            print0(f"iteration {it}: non-finite {', '.join(bad)}; optimizer step skipped")
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return (sums / accum_steps).tolist(), float(grad_norm), bool(bad), flags[-1] > 0


def save_run_checkpoint(path: Path, payload: dict, generators: dict[str, torch.Generator], d: Dist) -> None:
    """Write a checkpoint with every rank's random streams (a collective: all ranks call it)."""
    rng = gather_objects(rng_state(generators, d.device), d)
    if d.is_main:
        atomic_save({**payload, "rng": rng, "world_size": d.world_size}, path)


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
        raise UserError(f"checkpoint {path} was made for another architecture: {'; '.join(diff)}")


def evaluate(model, raw_model: GPT, batches: dict[str, Batches], cfg: TrainConfig, d: Dist, ctx) -> dict:
    """Mean total/task/spatial loss per split over eval_iters batches per rank, averaged over ranks."""
    model.eval()
    out = {}
    for split, source in batches.items():
        g_batch = torch.Generator().manual_seed(cfg.seed + 7919 * (d.rank + 1))
        g_nbhd = torch.Generator(device=d.device).manual_seed(cfg.seed + 104729 * (d.rank + 1))
        sums = torch.zeros(3 + raw_model.config.n_sites, device=d.device)
        with torch.no_grad():
            for _ in range(cfg.eval_iters):
                x, y = source.get(g_batch)
                with ctx:
                    _, losses = raw_model(x, y, units=raw_model.sample_units(g_nbhd), return_logits=False)
                sums += torch.cat([torch.stack([losses.total, losses.task, losses.spatial]).float(), losses.per_site.float()])
        if d.ddp:
            dist.all_reduce(sums)
        sums = (sums / (cfg.eval_iters * d.world_size)).tolist()
        out[split] = {"loss": sums[0], "task": sums[1], "spatial": sums[2], "sites": sums[3:]}
    model.train()
    return out


def main(argv: list[str]) -> None:
    cfg: TrainConfig = load_config(TrainConfig, argv, default_file="train_shakespeare.yaml")
    d = setup_distributed(cfg.device, cfg.backend)
    try:
        train(cfg, d)
    finally:
        cleanup_distributed(d)


def train(cfg: TrainConfig, d: Dist) -> None:
    if cfg.gradient_accumulation_steps % d.world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible "
                        f"by the {d.world_size} ranks")
    accum_steps = cfg.gradient_accumulation_steps // d.world_size
    dtype = resolve_dtype(cfg.dtype, d.device)
    run_dir = cfg.run_dir()
    data_dir = resolve_path(cfg.dataset, DATA_DIR)
    batches = {split: Batches(data_dir / f"{split}.bin", cfg, d.device) for split in ("train", "val")}
    output_ids = None
    if cfg.output_vocab == "corpus":
        output_ids = token_ids_used([source.path for source in batches.values()], cfg.vocab_size)

    # Everything that can refuse the run is checked before anything is written.
    ckpt = None
    if cfg.init_from == "resume":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"init_from=resume but {run_dir} holds no checkpoint")
        ckpt_file = ckpts[-1]
        ckpt = load_checkpoint(ckpt_file)
        check_resume_config(ckpt, cfg, ckpt_file, 0 if output_ids is None else len(output_ids))
        coords, positions_source = None, f"checkpoint {ckpt_file.name}"
    else:
        coords, positions_source = positions_for(cfg)
        if list_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints; use init_from=resume to continue it "
                            f"or another run_name/out_dir for a new run")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = GPT(cfg.model_config(0 if output_ids is None else len(output_ids)), coords, output_ids).to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {
        "batch": torch.Generator().manual_seed(cfg.seed + d.rank),
        "nbhd": torch.Generator(device=d.device).manual_seed(cfg.seed + 1_000_003 * (d.rank + 1)),
    }
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank
    iter_num, best_val_loss, wandb_id = 0, float("inf"), None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt)
        iter_num, best_val_loss, wandb_id = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("wandb_id")
        if ckpt.get("world_size") == d.world_size:
            set_rng_state(ckpt["rng"][d.rank], generators, d.device)
        else:
            print0(f"warning: checkpoint was written by {ckpt.get('world_size')} ranks, now {d.world_size}: "
                   f"random streams are re-seeded, so the run continues but not bit-exactly")
        del ckpt
    start_iter = iter_num
    model = opt.wrap()

    run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonLog(run_dir / "log.jsonl", d.is_main)
    tokens_per_iter = accum_steps * d.world_size * cfg.batch_size * cfg.block_size
    print0(f"run folder: {run_dir}")
    print0(f"device {d.device} x {d.world_size} rank(s), dtype {dtype}, {raw_model.get_num_params() / 1e6:.2f}M parameters, "
           f"positions from {positions_source}")
    print0(f"tokens per iteration: {tokens_per_iter:,} ({accum_steps} micro-steps x {d.world_size} ranks x "
           f"{cfg.batch_size} x {cfg.block_size})")
    log.write(event="start" if cfg.init_from == "scratch" else "resume", iter=iter_num, world_size=d.world_size,
              config=asdict(cfg))
    wandb_run = None
    if cfg.wandb_log and d.is_main:
        import wandb
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or run_dir.name, config=asdict(cfg),
                               id=wandb_id, resume="allow", dir=str(run_dir))
        wandb_id = wandb_run.id

    def save(it: int) -> None:
        save_run_checkpoint(checkpoint_path(run_dir, it), {
            "format": "topolm-ckpt-v1",
            "model": raw_model.state_dict(),
            "model_config": asdict(raw_model.config),
            "config": asdict(cfg),
            **opt.state_dict(),
            "iter_num": it,
            "best_val_loss": best_val_loss,
            "wandb_id": wandb_id,
        }, generators, d)
        if d.is_main and cfg.keep_last:
            for old in list_checkpoints(run_dir)[:-cfg.keep_last]:
                old.unlink()
        print0(f"saved checkpoint {checkpoint_path(run_dir, it)}")

    def run_eval(it: int) -> dict:
        nonlocal best_val_loss
        res = evaluate(model, raw_model, batches, cfg, d, opt.ctx)
        improved = res["val"]["loss"] < best_val_loss
        best_val_loss = min(best_val_loss, res["val"]["loss"])
        print0(f"step {it}: train loss {res['train']['loss']:.4f} (task {res['train']['task']:.4f}, spatial "
               f"{res['train']['spatial']:.4f}), val loss {res['val']['loss']:.4f} (task {res['val']['task']:.4f}, "
               f"spatial {res['val']['spatial']:.4f})")
        log.write(event="eval", iter=it, train=res["train"], val=res["val"], lr=learning_rate_at(it, cfg))
        if wandb_run:
            wandb_run.log({"iter": it, "train/loss": res["train"]["loss"], "train/task": res["train"]["task"],
                           "train/spatial": res["train"]["spatial"], "val/loss": res["val"]["loss"],
                           "val/task": res["val"]["task"], "val/spatial": res["val"]["spatial"],
                           **{f"val/sl/{n}": v for n, v in zip(raw_model.site_names, res["val"]["sites"])}}, step=it)
        return {"improved": improved}

    if cfg.eval_only:
        run_eval(iter_num)
        return

    stop = StopSignal()
    stat_names = ["task", None] + [f"spatial site {n}" for n in raw_model.site_names]  # task, spatial, sites
    last_eval = {"improved": True}
    t0 = time.time()
    running_mfu = -1.0
    peak = peak_flops(d.device)

    def micro_step(model):
        x, y = batches["train"].get(generators["batch"])
        _, losses = model(x, y, units=raw_model.sample_units(generators["nbhd"]), return_logits=False)
        return losses.total, torch.cat([torch.stack([losses.task, losses.spatial]), losses.per_site])

    try:
        while iter_num < cfg.max_iters:
            if iter_num % cfg.eval_interval == 0:
                last_eval = run_eval(iter_num)
            if iter_num % cfg.save_interval == 0 and iter_num != start_iter:
                if cfg.always_save_checkpoint or last_eval["improved"]:
                    save(iter_num)

            lr = learning_rate_at(iter_num, cfg)
            stats, grad_norm, skipped, stop_now = opt.step(iter_num, lr, accum_steps, micro_step, stat_names,
                                                           stop.requested)
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            iter_num += 1
            if (iter_num - 1) % cfg.log_interval == 0:
                task, spatial = stats[0], stats[1]
                mfu_text = ""
                if peak and iter_num - start_iter > 5:
                    mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak)
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                    mfu_text = f", mfu {running_mfu * 100:.1f}%"
                print0(f"iter {iter_num - 1}: loss {task + spatial:.4f} (task {task:.4f}, spatial {spatial:.4f}), "
                       f"{dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s{mfu_text}")
                log.write(event="train", iter=iter_num - 1, loss=task + spatial, task=task, spatial=spatial,
                          sites=stats[2:], lr=lr, grad_norm=grad_norm, skipped=skipped, dt=dt)
                if wandb_run:
                    wandb_run.log({"iter": iter_num - 1, "train/step_loss": task + spatial, "train/step_task": task,
                                   "train/step_spatial": spatial, "lr": lr}, step=iter_num - 1)
            if stop_now:
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
