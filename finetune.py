"""Finetune a pretrained TopoLM on a GLUE task, with the spatial loss still on.

    python finetune.py finetune_glue.yaml ckpt=out/<run> task=cola
    python finetune.py finetune_glue.yaml ckpt=out/<run> task=rte data_dir=path/to/glue   # local files
    torchrun --standalone --nproc_per_node=4 finetune.py finetune_glue.yaml ckpt=out/<run> task=mnli \\
        batch_size=16 gradient_accumulation_steps=4
    python glue_summary.py                                 # one table over finetuned/*/metrics.json

Writes into out_dir/<task>/ (default finetuned/<task>/): `ckpt-best.pt` (the model at its best
validation loss), `log.jsonl`, `metrics.json` (the best model's metrics on the full validation
set(s)) and `predictions-<split>.jsonl` (its prediction for every validation example). While it
runs, `ckpt-last.pt` holds the state after the latest evaluation; SIGTERM/SIGINT save it and exit,
and `init_from=resume` continues bit-exactly (it is deleted when the run ends normally).

Design decisions
- The model is the pretrained GPT (positions, alpha, radius and architecture from its checkpoint;
  dropout set to `dropout`) plus a new linear head (`model.SequenceClassifier`) reading the final
  hidden state of each sequence's last real token. Batches are right-padded and attention stays
  causal, so real tokens never see the padding; `lengths` tells the head where to read and keeps the
  pad rows out of the spatial loss (the research code read a pad token, and its attention mask
  made attention bidirectional).
- Sentence pairs are joined as `tokens(a) + <|endoftext|> + tokens(b)`, in training and evaluation
  alike; a pair longer than `max_length` is cut longest-first, from the end of each part.
- The loss is the task loss (cross-entropy, or mean squared error for STS-B) plus
  `alpha_scale x alpha x SL` summed over sites, SL the same sampled spatial loss as in pretraining.
- Each epoch's shuffle comes from its own seed (seed + epoch), so the batches of any step follow
  from its number alone and a resumed run needs no data-loader state.
- Evaluation runs on the whole validation split(s), sharded over ranks and gathered. Early stopping
  watches the task loss on the first validation split (matched, for MNLI); `patience`
  evaluations without a new best end the run.
- The optimizer step (AdamW, autocast, grad scaler, DDP, non-finite checks) is training.Optimization,
  shared with pretraining; the checkpoint (topolm/checkpoint.py) has pretraining's format plus `head` and
  `task`, so sample.py and any analysis that loads a GPT also load a finetuned backbone.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from topolm.checkpoint import (build_classifier, find_checkpoint, load_checkpoint, make_payload,
                               require_gpt2_tokenizer, require_permutation_layout)
from topolm.tokenizer import EOT_TOKEN
from topolm.config import CheckpointKey, LoopConfig, UserError, cli_main, load_config, require, require_finite
from topolm.distributed import Dist, print0, run_distributed
from topolm.files import atomic_write, remove_partial_writes
from topolm.provenance import provenance
from topolm.glue import GLUE_TASKS, Examples, compute_metrics, load_glue, task_score, tokenize
from model import SequenceClassifier
from topolm.training import (JsonLog, Optimization, StopSignal, accumulation_per_rank, check_wandb,
                             gather_objects, learning_rate_at, params_digest, resolve_dtype, restore_streams,
                             save_run_checkpoint, start_wandb, stream_seed)


# ----------------------------------------------------------------------------- config

@dataclass
class FinetuneConfig(CheckpointKey, LoopConfig):
    """finetune.py's keys: its own below, the optimizer's, batches', logging and system keys from
    topolm.config.LoopConfig. Where finetuning needs another default for a shared key, it is redeclared
    here with only the default changed (the Hugging Face Trainer's AdamW, the paper's batch 64 and
    constant lr 2e-5). `max_iters` is this script's own: 0 means no limit besides max_epochs."""
    # ---- what to finetune (ckpt: topolm.config.CheckpointKey), on what
    task: Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"] = "cola"
    """GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli."""
    data_dir: str = ""
    """Folder with one subfolder per task holding <split>.parquet/.jsonl/.tsv files with the GLUE
    columns; empty loads nyu-mll/glue through datasets (the Hub, or its local cache)."""
    max_length: int = 128
    """Tokens per example; longer examples are cut (pairs longest-first). At most the model's block_size."""
    max_train_examples: int = 0
    """Use only the first this many training examples (0: all); validation always uses every example."""
    init_from: Literal["pretrained", "resume"] = "pretrained"
    """'pretrained' starts from `ckpt`; 'resume' continues a stopped run from out_dir/<task>/ckpt-last.pt."""
    # ---- output
    out_dir: str = "finetuned"
    """Results go to out_dir/<task>/."""
    overwrite: bool = False
    """Replace every output of an earlier finetuning in out_dir/<task>/ (refused otherwise)."""
    # ---- model
    dropout: float = 0.1
    """Dropout in the GPT and before the head during finetuning, in [0, 1)."""
    alpha_scale: float = 1.0
    """Spatial loss weight during finetuning = alpha_scale x the checkpoint's alpha; 0 turns it off."""
    # ---- shared keys with finetuning's defaults
    batch_size: int = 64
    """Examples per micro-batch and rank (the paper: 64)."""
    learning_rate: float = 2e-5
    """Peak (or constant) learning rate (the paper: 2e-5, constant)."""
    decay_lr: bool = False
    """Linear warmup then cosine decay to min_lr; False keeps learning_rate constant (the paper)."""
    warmup_iters: int = 0
    """Warmup steps (with decay_lr)."""
    lr_decay_iters: int = 10000
    """Step at which the cosine reaches min_lr (with decay_lr)."""
    min_lr: float = 2e-6
    """Final learning rate (with decay_lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the Hugging Face Trainer's default: none)."""
    beta2: float = 0.999
    """AdamW beta2 (the Hugging Face Trainer's default)."""
    log_interval: int = 10
    """Print and log the training loss every this many iterations."""
    wandb_project: str = "topolm-glue"
    """wandb project name."""
    # ---- length of the run
    max_epochs: int = 10
    """Passes over the training set at most."""
    max_iters: int = 0
    """Optimizer steps at most (0: no limit besides max_epochs; unlike train.py's max_iters)."""
    eval_interval: int = 0
    """Evaluate on the full validation set every this many steps; 0 evaluates after every epoch."""
    patience: int = 3
    """Stop after this many evaluations without a new best validation task loss."""

    def __post_init__(self):
        super().__post_init__()  # the optimizer's, loop's and system keys
        for key in ("max_length", "max_epochs", "patience"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        for key in ("max_train_examples", "max_iters", "eval_interval", "alpha_scale"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        require(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        require_finite(self.alpha_scale, "alpha_scale")
        require(not (self.overwrite and self.init_from == "resume"),
                "init_from=resume continues the earlier run but overwrite=true would replace it; pass only one")

    def task_dir(self) -> Path:
        return Path(self.out_dir) / self.task


# ----------------------------------------------------------------------------- data

def collate(examples: Examples, index: np.ndarray, device: str):
    """Right-padded token ids (B, T), lengths (B,) and labels (B,) of the examples at `index`."""
    seqs = [examples.ids[i] for i in index]
    lengths = np.array([len(s) for s in seqs])
    idx = np.full((len(seqs), lengths.max()), EOT_TOKEN, dtype=np.int64)  # any id: never attended to or read
    for row, s in enumerate(seqs):
        idx[row, :len(s)] = s
    labels = torch.from_numpy(examples.labels[index])
    return (torch.from_numpy(idx).to(device), torch.from_numpy(lengths).to(device), labels.to(device))


def task_loss(outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    outputs = outputs.float()
    if outputs.size(-1) == 1:
        return F.mse_loss(outputs.squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(outputs, labels, reduction=reduction)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: SequenceClassifier, examples: Examples, cfg: FinetuneConfig, d: Dist, ctx) -> dict:
    """Task loss, mean spatial loss and predictions over a whole split, sharded over ranks."""
    was_training = model.training
    model.eval()
    g_nbhd = torch.Generator(device=d.device).manual_seed(cfg.seed + 104729 * (d.rank + 1))
    mine = np.arange(d.rank, len(examples), d.world_size)
    rows, spatial_sum, n_batches = [], 0.0, 0
    for start in range(0, len(mine), cfg.batch_size):
        index = mine[start:start + cfg.batch_size]
        idx, lengths, labels = collate(examples, index, d.device)
        with ctx:
            outputs, per_site = model(idx, lengths, units=model.gpt.sample_units(g_nbhd))
        losses = task_loss(outputs, labels, reduction="none").tolist()
        preds = (outputs.float().squeeze(-1) if outputs.size(-1) == 1 else outputs.argmax(-1)).tolist()
        rows.extend(zip(index.tolist(), preds, losses))
        if per_site is not None:
            spatial_sum += float(model.gpt.config.alpha * per_site.sum())
            n_batches += 1
    gathered = gather_objects((rows, spatial_sum, n_batches), d)
    rows = sorted(r for part in gathered for r in part[0])
    n_batches = sum(part[2] for part in gathered)
    model.train(was_training)
    return {
        "pred": np.array([r[1] for r in rows]),
        "task": float(np.mean([r[2] for r in rows])),
        "spatial": sum(part[1] for part in gathered) / n_batches if n_batches else 0.0,
    }


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> None:
    run_distributed(load_config(FinetuneConfig, argv, default_file="finetune_glue.yaml"), finetune)


def build_model(ckpt: dict, cfg: FinetuneConfig, n_outputs: int, resume: bool) -> SequenceClassifier:
    """The classifier from a pretrained checkpoint (dropout and alpha set for finetuning, a new head),
    or from a finetuning run's ckpt-last.pt (whose config already has them, and its head)."""
    if resume:
        return build_classifier(ckpt, head_dropout=cfg.dropout)
    alpha = ckpt["model_config"]["alpha"] * cfg.alpha_scale
    return build_classifier({k: v for k, v in ckpt.items() if k != "head"}, n_outputs, head_dropout=cfg.dropout,
                            dropout=cfg.dropout, alpha=alpha)


RESUME_KEYS = ("task", "data_dir", "max_length", "max_train_examples", "batch_size", "gradient_accumulation_steps",
               "dropout", "alpha_scale", "seed")  # a resumed run must see the same data, order and model


def finetune(cfg: FinetuneConfig, d: Dist) -> None:
    spec = GLUE_TASKS[cfg.task]
    accum_steps = accumulation_per_rank(cfg.gradient_accumulation_steps, d)
    dtype = resolve_dtype(cfg.dtype, d.device)
    task_dir = cfg.task_dir()
    last_file = task_dir / "ckpt-last.pt"

    # Everything that can refuse the run is checked before anything is written.
    if cfg.init_from == "resume":
        if not last_file.is_file():
            raise UserError(f"init_from=resume but {task_dir} holds no ckpt-last.pt (a run that ended "
                            f"normally leaves none); use init_from=pretrained to start a run")
        ckpt = load_checkpoint(last_file)
        saved = ckpt["config"]
        diff = [f"{k}={saved.get(k)!r} before vs {getattr(cfg, k)!r} now" for k in RESUME_KEYS
                if saved.get(k) != getattr(cfg, k)]
        if diff:
            raise UserError(f"cannot resume {last_file} with other settings: {'; '.join(diff)}; set them as before "
                            f"(or start anew with init_from=pretrained overwrite=true)")
        ckpt_file, pretrained = last_file, ckpt["pretrained"]
    else:
        earlier = sorted(p.name for pattern in OUTPUTS[:3] for p in task_dir.glob(pattern))
        if earlier and not cfg.overwrite:
            hint = "init_from=resume to continue it, " if last_file.exists() else ""
            raise UserError(f"{task_dir} already holds {', '.join(earlier)}; pass {hint}overwrite=true to replace "
                            f"it, or another out_dir")
        ckpt_file = find_checkpoint(cfg.ckpt)
        ckpt = load_checkpoint(ckpt_file)
        if "head" in ckpt:
            print0(f"note: {ckpt_file} is itself finetuned; its head is dropped and a new one trained")
        pretrained = {"path": str(ckpt_file), "iter_num": ckpt.get("iter_num"), "alpha": ckpt["model_config"]["alpha"],
                      "provenance": provenance(ckpt_file, ckpt)}
    block_size = ckpt["model_config"]["block_size"]
    if cfg.max_length > block_size:
        raise UserError(f"max_length={cfg.max_length} exceeds the checkpoint's block_size={block_size}; set "
                        f"max_length <= {block_size}")
    require_gpt2_tokenizer(ckpt, ckpt_file, "GLUE text")
    if cfg.alpha_scale > 0 and ckpt["model_config"]["alpha"] > 0:
        require_permutation_layout(ckpt, ckpt_file, f"finetuning with alpha_scale={cfg.alpha_scale:g}",
                                   "; pass alpha_scale=0 to finetune without it")
    check_wandb(cfg)
    raw = load_glue(cfg.task, cfg.data_dir)
    source = str(Path(cfg.data_dir) / cfg.task) if cfg.data_dir else f"nyu-mll/glue/{cfg.task}"
    train_set = tokenize(raw["train"], cfg.task, cfg.max_length, cfg.max_train_examples, f"{source}/train")
    val_sets = {s: tokenize(raw[s], cfg.task, cfg.max_length, 0, f"{source}/{s}") for s in spec.val_splits}
    for name, ex in [("train", train_set), *val_sets.items()]:
        if len(ex) == 0:
            raise UserError(f"{source}/{name} holds no examples")
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {len(train_set)} examples; one optimizer step needs "
                        f"{per_step} (batch_size x gradient_accumulation_steps): lower batch_size or "
                        f"gradient_accumulation_steps" + (" or raise max_train_examples" if cfg.max_train_examples
                                                          else ""))

    torch.manual_seed(cfg.seed)  # identical head on every rank
    raw_model = build_model(ckpt, cfg, spec.n_outputs, resume=cfg.init_from == "resume").to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {"nbhd": torch.Generator(device=d.device).manual_seed(stream_seed(cfg.seed, "nbhd", d.rank))}
    torch.manual_seed(stream_seed(cfg.seed, "dropout", d.rank))  # dropout differs per rank
    iter_num, evals_since_best, wandb_id = 0, 0, None
    best = {"loss": float("inf"), "iter": -1, "splits": None}
    if cfg.init_from == "resume":
        opt.load_state_dict(ckpt)
        iter_num, evals_since_best, wandb_id = ckpt["iter_num"], ckpt["evals_since_best"], ckpt.get("wandb_id")
        best = ckpt["best"]
        restore_streams(ckpt, generators, d, cfg.seed, str(last_file))
    tokenizer, layout_source = ckpt["tokenizer"], ckpt["layout"]["source"]
    del ckpt
    opt.wrap()
    max_iters = steps_per_epoch * cfg.max_epochs
    if cfg.max_iters:
        max_iters = min(max_iters, cfg.max_iters)
    eval_interval = cfg.eval_interval or steps_per_epoch

    fresh = cfg.init_from == "pretrained"
    if d.is_main:
        task_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(task_dir)
        if fresh:  # an overwrite replaces every output of the old run (its log too), never mixes them
            for old in [p for pattern in OUTPUTS for p in task_dir.glob(pattern)]:
                old.unlink()
    log = JsonLog(task_dir / "log.jsonl", d.is_main, fresh=fresh)
    print0(f"finetuning {pretrained['path']} on {cfg.task}: {len(train_set):,} training examples "
           f"({train_set.truncated} cut to {cfg.max_length} tokens), "
           + ", ".join(f"{len(v):,} {s}" for s, v in val_sets.items())
           + (f"; resumed at step {iter_num}" if cfg.init_from == "resume" else ""))
    print0(f"device {d.device} x {d.world_size} rank(s), dtype {dtype}, {steps_per_epoch} steps per epoch of "
           f"{per_step} examples, at most {max_iters} steps; spatial weight alpha = {raw_model.gpt.config.alpha:g}; "
           f"results in {task_dir}")
    log.write(event="start" if cfg.init_from == "pretrained" else "resume", iter=iter_num, world_size=d.world_size,
              config=asdict(cfg), pretrained=pretrained, n_train=len(train_set),
              n_val={s: len(v) for s, v in val_sets.items()})
    wandb_run = start_wandb(cfg, task_dir, run_id=wandb_id,
                            name=cfg.wandb_run_name or f"{cfg.task}-{Path(pretrained['path']).parent.name}") \
        if d.is_main else None
    wandb_id = wandb_run.id if wandb_run else wandb_id

    def model_payload(it: int) -> dict:
        return make_payload(raw_model.gpt, kind="finetune", config=asdict(cfg), iter_num=it, tokenizer=tokenizer,
                            layout_source=layout_source, head=raw_model.head.state_dict(),
                            task={"name": cfg.task, "n_outputs": spec.n_outputs,
                                  "text_columns": list(spec.text_columns)},
                            pretrained=pretrained)

    def save_last(it: int) -> None:
        """Everything a resumed run needs: weights, optimizer, best so far, patience, random streams."""
        save_run_checkpoint(last_file, {**model_payload(it), **opt.state_dict(), "best": best,
                                        "evals_since_best": evals_since_best, "wandb_id": wandb_id},
                            generators, d)

    def run_eval(it: int) -> None:
        nonlocal evals_since_best
        results = {s: evaluate(raw_model, ex, cfg, d, opt.ctx) for s, ex in val_sets.items()}
        splits = {s: {"loss": r["task"], "spatial": r["spatial"], "n": len(val_sets[s]),
                      **compute_metrics(cfg.task, r["pred"], val_sets[s].labels)} for s, r in results.items()}
        watched = results[spec.val_splits[0]]["task"]
        improved = watched < best["loss"]
        evals_since_best = 0 if improved else evals_since_best + 1
        text = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n")
                         for s, m in splits.items())
        print0(f"eval at step {it}: {text}{' (best)' if improved else ''}")
        log.write(event="eval", iter=it, splits=splits, improved=improved)
        if wandb_run:
            wandb_run.log({f"{s}/{k}": v for s, m in splits.items() for k, v in m.items()}, step=it)
        if improved:
            best.update(loss=watched, iter=it, splits=splits)
            save_run_checkpoint(task_dir / "ckpt-best.pt", {**model_payload(it), "best_val_loss": watched},
                                generators, d)
            if d.is_main:
                write_predictions(task_dir, {s: r["pred"] for s, r in results.items()}, val_sets)

    epoch_order = {}

    def step_batches(it: int):
        """This rank's micro-batches for optimizer step `it`: each epoch is its own seeded shuffle
        (drop-last), so any step's batches follow from its number alone, also after a resume."""
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in epoch_order:
            epoch_order.clear()
            g = torch.Generator().manual_seed(cfg.seed + 7919 * epoch)
            epoch_order[epoch] = torch.randperm(len(train_set), generator=g).numpy()
        chunk = epoch_order[epoch][step * per_step:(step + 1) * per_step]
        return iter([chunk[(m * d.world_size + d.rank) * cfg.batch_size:][:cfg.batch_size] for m in range(accum_steps)])

    def micro_steps(it: int):
        """The micro-step function of optimizer step `it`: each call runs its next micro-batch."""
        batch_index = step_batches(it)

        def micro_step(model):
            idx, lengths, labels = collate(train_set, next(batch_index), d.device)
            outputs, per_site = model(idx, lengths, units=raw_model.gpt.sample_units(generators["nbhd"]))
            losses = raw_model.gpt.combine_losses(task_loss(outputs, labels), per_site)
            return losses.total, {"task": losses.task, "spatial": losses.spatial}
        return micro_step

    stop = StopSignal()
    reason = "max_iters" if max_iters < steps_per_epoch * cfg.max_epochs else "max_epochs"
    t0 = time.time()
    try:
        while iter_num < max_iters and not (best["iter"] >= 0 and evals_since_best >= cfg.patience):
            lr = learning_rate_at(iter_num, cfg)
            step = opt.step(iter_num, lr, accum_steps, micro_steps(iter_num), {"task": "task", "spatial": "spatial"},
                            stop.requested)
            task, spatial = step.stats["task"], step.stats["spatial"]
            iter_num += 1
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if (iter_num - 1) % cfg.log_interval == 0:
                print0(f"iter {iter_num - 1} (epoch {(iter_num - 1) / steps_per_epoch:.2f}): loss "
                       f"{task + spatial:.4f} (task {task:.4f}, spatial {spatial:.4f}), {dt * 1000:.0f} ms/iter"
                       + (" (step skipped)" if step.skipped else ""))
                log.write(event="train", iter=iter_num - 1, task=task, spatial=spatial, lr=lr,
                          grad_norm=step.grad_norm, skipped=step.skipped, loss_scale=step.loss_scale, dt=dt)
            eval_due = iter_num % eval_interval == 0 or iter_num == max_iters
            if eval_due:
                run_eval(iter_num)
            if eval_due or step.stop:
                save_last(iter_num)
            if step.stop:
                print0(f"stop requested: saved {last_file} at step {iter_num}; continue with init_from=resume")
                log.write(event="stopped", iter=iter_num)
                return
        if evals_since_best >= cfg.patience and best["iter"] >= 0:
            reason = "early stopping"
        if best["splits"] is None:
            run_eval(iter_num)
        digests = gather_objects(params_digest(raw_model), d)
        if d.ddp and len(set(digests)) != 1:
            raise UserError("ranks ended with different weights")
        if d.is_main:
            write_metrics(task_dir, cfg, best, iter_num, steps_per_epoch, reason, pretrained)
            last_file.unlink(missing_ok=True)  # the run is complete: nothing left to resume
        log.write(event="end", iter=iter_num, reason=reason, best_iter=best["iter"], param_sha256=digests)
        print0(f"{reason} after {iter_num} steps; best at step {best['iter']}: "
               f"{cfg.task} score {task_score(cfg.task, best['splits']):.4f}; wrote {task_dir / 'metrics.json'}")
    finally:
        stop.restore()
        if wandb_run:
            wandb_run.finish()


OUTPUTS = ("ckpt-best.pt", "ckpt-last.pt", "metrics.json", "log.jsonl", "predictions-*.jsonl")


def write_predictions(task_dir: Path, preds: dict[str, np.ndarray], val_sets: dict) -> None:
    for split, pred in preds.items():
        labels = val_sets[split].labels
        lines = "".join(json.dumps({"index": i, "prediction": p, "label": lab}) + "\n"
                        for i, (p, lab) in enumerate(zip(pred.tolist(), labels.tolist())))
        atomic_write(task_dir / f"predictions-{split}.jsonl", lines)


def write_metrics(task_dir: Path, cfg: FinetuneConfig, best: dict, iters: int, steps_per_epoch: int, reason: str,
                  pretrained: dict) -> None:
    metrics = {
        "task": cfg.task,
        "score": task_score(cfg.task, best["splits"]),
        "metrics": GLUE_TASKS[cfg.task].metrics,
        "splits": best["splits"],
        "best_iter": best["iter"],
        "best_epoch": best["iter"] / steps_per_epoch,
        "iters": iters,
        "stop_reason": reason,
        "pretrained": pretrained,
        "alpha_scale": cfg.alpha_scale,
        "checkpoint": str(task_dir / "ckpt-best.pt"),
    }
    atomic_write(task_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    cli_main(main)
