"""Finetune a pretrained TopoLM on a GLUE task, with the spatial loss still on.

    python finetune.py finetune_glue.yaml ckpt=out/<run> task=cola
    python finetune.py finetune_glue.yaml ckpt=out/<run> task=rte data_dir=path/to/glue   # local files
    torchrun --standalone --nproc_per_node=4 finetune.py finetune_glue.yaml ckpt=out/<run> task=mnli \\
        batch_size=16 gradient_accumulation_steps=4
    python glue_summary.py                                 # one table over finetuned/*/metrics.json

Writes into out_dir/<task>/ (default finetuned/<task>/): `ckpt-best.pt` (the model at its best
validation loss), `log.jsonl`, `metrics.json` (the best model's metrics on the full validation
set(s)) and `predictions-<split>.jsonl` (its prediction for every validation example). While it
runs, `ckpt-last.pt` holds the state after the latest evaluation; SIGTERM/SIGINT/SIGUSR1 save it at
the last completed step (an evaluation they interrupt is abandoned and left pending) and exit, and
`init_from=resume` continues bit-exactly (it is deleted when the run ends normally).

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
- Each epoch's shuffle comes from its own seed (training.epoch_seed), so the batches of any step follow
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
from functools import partial
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from torch.nn import functional as F

from topolm.checkpoint import (build_classifier, find_checkpoint, load_checkpoint, make_payload,
                               require_gpt2_tokenizer, require_permutation_layout)
from topolm.tokenizer import EOT_TOKEN
from topolm.config import CheckpointKey, LoopConfig, UserError, cli_main, load_config, require, require_finite
from topolm.distributed import Dist, check_on_main, print0, run_distributed
from topolm.files import atomic_write, remove_partial_writes, require_writable
from topolm.provenance import provenance
from topolm.glue import GLUE_TASKS, Examples, compute_metrics, load_glue, task_score, tokenize
from model import GPTConfig, SequenceClassifier
from topolm.signals import StopFlag
from topolm.training import (JsonLog, Optimization, RunCheckpoints, StepResult, accumulation_per_rank, check_wandb,
                             epoch_seed, eval_seeds, gather_objects, learning_rate_at, params_digest, reduce_with_stop,
                             resolve_dtype, resume_command, start_wandb, stream_seed)


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
    """Spatial loss weight of each site during finetuning = alpha_scale x the checkpoint's weight of that site
    (its alpha, alpha_attn, alpha_mlp or alpha_sites); 0 turns it off."""
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

class EpochBatches:
    """This rank's micro-batches of every optimizer step. Each epoch is its own seeded shuffle of the
    training set (training.epoch_seed; drop-last), so the batches of any step follow from its number
    alone, also after a resume. An optimizer step takes `per_step` examples: micro-batch m of rank r
    is the (m x world_size + r)-th run of batch_size examples among them."""

    def __init__(self, examples: Examples, cfg: FinetuneConfig, d: Dist, accum_steps: int):
        self.examples, self.seed, self.d, self.accum_steps = examples, cfg.seed, d, accum_steps
        self.batch_size = cfg.batch_size
        self.per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.steps_per_epoch = len(examples) // self.per_step
        self._epoch, self._order = -1, None  # the shuffle of the latest epoch asked for

    def step_indices(self, it: int) -> list[np.ndarray]:
        """Example indices of this rank's micro-batches of optimizer step `it` (0-based), in order."""
        epoch, step = divmod(it, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.examples), generator=g).numpy()
        chunk = self._order[step * self.per_step:(step + 1) * self.per_step]
        w, r, b = self.d.world_size, self.d.rank, self.batch_size
        return [chunk[(m * w + r) * b:][:b] for m in range(self.accum_steps)]


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
def evaluate(model: SequenceClassifier, examples: Examples, cfg: FinetuneConfig, d: Dist, ctx,
             stop: StopFlag | None = None) -> dict | None:
    """Task loss, mean spatial loss (model.GPT.combine_losses' alpha-weighted sum over sites) and
    predictions over a whole split, sharded over ranks.

    `stop` is read after every batch (under DDP all-reduced with the batch's spatial sum, so every rank
    leaves at the same batch; a rank whose shard has one batch fewer takes part with nothing); once it
    is set, the evaluation is abandoned and None returned."""
    was_training = model.training
    model.eval()
    g_nbhd = torch.Generator(device=d.device).manual_seed(eval_seeds(cfg.seed, d.rank)[1])
    mine = np.arange(d.rank, len(examples), d.world_size)
    largest_shard = -(-len(examples) // d.world_size)
    n_steps = -(-largest_shard // cfg.batch_size)  # every rank takes part in as many batches as the largest shard has
    # spatial sum and batch count over all ranks, on the device (NCCL reduces device tensors only)
    rows, totals = [], torch.zeros(2, dtype=torch.float64, device=d.device)
    try:
        for start in range(0, n_steps * cfg.batch_size, cfg.batch_size):
            index = mine[start:start + cfg.batch_size]
            batch = torch.zeros(2, dtype=torch.float64, device=d.device)
            if len(index):
                idx, lengths, labels = collate(examples, index, d.device)
                with ctx:
                    outputs, per_site = model(idx, lengths, units=model.gpt.sample_units(g_nbhd))
                per_example = task_loss(outputs, labels, reduction="none")
                preds = (outputs.float().squeeze(-1) if outputs.size(-1) == 1 else outputs.argmax(-1)).tolist()
                rows.extend(zip(index.tolist(), preds, per_example.tolist()))
                if per_site is not None:
                    spatial = float(model.gpt.combine_losses(per_example.mean(), per_site).spatial)
                    batch += torch.tensor([spatial, 1.0], dtype=torch.float64, device=d.device)
            batch, stopped = reduce_with_stop(batch, stop, d)
            if stopped:
                return None
            totals += batch
    finally:
        model.train(was_training)
    rows = sorted(r for part in gather_objects(rows, d) for r in part)
    spatial_sum, n_batches = totals.tolist()
    return {
        "pred": np.array([r[1] for r in rows]),
        "task": float(np.mean([r[2] for r in rows])),
        "spatial": spatial_sum / n_batches if n_batches else 0.0,
    }


# ----------------------------------------------------------------------------- the run's state

def build_model(ckpt: dict, cfg: FinetuneConfig, n_outputs: int, resume: bool) -> SequenceClassifier:
    """The classifier from a pretrained checkpoint (dropout and alpha set for finetuning, a new head),
    or from a finetuning run's ckpt-last.pt (whose config already has them, and its head)."""
    if resume:
        return build_classifier(ckpt, head_dropout=cfg.dropout)
    alpha = GPTConfig(**ckpt["model_config"]).scaled_alpha(cfg.alpha_scale)  # every site's weight, scaled
    return build_classifier({k: v for k, v in ckpt.items() if k != "head"}, n_outputs, head_dropout=cfg.dropout,
                            dropout=cfg.dropout, **alpha)


RESUME_KEYS = ("task", "data_dir", "max_length", "max_train_examples", "batch_size", "gradient_accumulation_steps",
               "dropout", "alpha_scale", "seed")  # a resumed run must see the same data, order and model
OVERWRITE_OFF = {"overwrite": "false"}  # a resume refuses overwrite=true
CHECKS = {"task": "task", "spatial": "spatial"}  # the statistics the optimizer step checks for non-finite values


@dataclass
class Inputs:
    """What a run starts from, checked before anything is written."""
    ckpt: dict  # the pretrained checkpoint, or the ckpt-last.pt a resume continues
    ckpt_file: Path
    pretrained: dict  # the backbone: path, iter_num, alpha
    train_set: Examples
    val_sets: dict[str, Examples]


@dataclass
class FinetuneRun:
    """Everything the loop reads and updates, passed explicitly to each of its steps."""
    cfg: FinetuneConfig
    d: Dist
    raw_model: SequenceClassifier
    opt: Optimization
    generators: dict[str, torch.Generator]
    ckpts: RunCheckpoints
    log: JsonLog
    wandb: object  # a wandb run or training.NullRun
    batches: EpochBatches
    val_sets: dict[str, Examples]
    record: dict  # the payload fields that describe the backbone: tokenizer, layout source, data, pretrained
    accum_steps: int
    max_iters: int
    eval_interval: int
    iter_num: int
    evals_since_best: int
    best: dict  # loss, iter and splits (metrics) of the best evaluation so far
    wandb_id: str | None
    eval_pending: bool  # the evaluation due at iter_num is still to be done (a stop abandoned it)

    @property
    def patience_exhausted(self) -> bool:
        return self.best["iter"] >= 0 and self.evals_since_best >= self.cfg.patience


# ----------------------------------------------------------------------------- setup

def check_inputs(cfg: FinetuneConfig) -> Inputs:
    """Everything that can refuse the run, checked before anything is written: the checkpoint (or the
    state a resume continues), its fit for the task, and the GLUE data."""
    task_dir, last_file = cfg.task_dir(), cfg.task_dir() / "ckpt-last.pt"
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
        backbone = GPTConfig(**ckpt["model_config"])
        pretrained = {"path": str(ckpt_file), "iter_num": ckpt.get("iter_num"), "alpha": backbone.alpha,
                      "alpha_sites": backbone.site_alpha, "provenance": provenance(ckpt_file, ckpt)}
    block_size = ckpt["model_config"]["block_size"]
    if cfg.max_length > block_size:
        raise UserError(f"max_length={cfg.max_length} exceeds the checkpoint's block_size={block_size}; set "
                        f"max_length <= {block_size}")
    require_gpt2_tokenizer(ckpt, ckpt_file, "GLUE text")
    if cfg.alpha_scale > 0 and GPTConfig(**ckpt["model_config"]).spatial_sites:
        require_permutation_layout(ckpt, ckpt_file, f"finetuning with alpha_scale={cfg.alpha_scale:g}",
                                   "; pass alpha_scale=0 to finetune without it")
    check_wandb(cfg)
    raw = load_glue(cfg.task, cfg.data_dir)
    source = str(Path(cfg.data_dir) / cfg.task) if cfg.data_dir else f"nyu-mll/glue/{cfg.task}"
    train_set = tokenize(raw["train"], cfg.task, cfg.max_length, cfg.max_train_examples, f"{source}/train")
    val_sets = {s: tokenize(raw[s], cfg.task, cfg.max_length, 0, f"{source}/{s}")
                for s in GLUE_TASKS[cfg.task].val_splits}
    for name, ex in [("train", train_set), *val_sets.items()]:
        if len(ex) == 0:
            raise UserError(f"{source}/{name} holds no examples")
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if len(train_set) < per_step:
        raise UserError(f"the training set has {len(train_set)} examples; one optimizer step needs "
                        f"{per_step} (batch_size x gradient_accumulation_steps): lower batch_size or "
                        f"gradient_accumulation_steps" + (" or raise max_train_examples" if cfg.max_train_examples
                                                          else ""))
    return Inputs(ckpt, ckpt_file, pretrained, train_set, val_sets)


def start_log(cfg: FinetuneConfig, d: Dist) -> JsonLog:
    """The task folder, cleared of unfinished writes, and its log; a new run (an overwrite) first removes
    every output of the old one (its log too), so the two are never mixed."""
    task_dir, fresh = cfg.task_dir(), cfg.init_from == "pretrained"
    if d.is_main:
        task_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(task_dir)
        if fresh:
            for old in [p for pattern in OUTPUTS for p in task_dir.glob(pattern)]:
                old.unlink()
    return JsonLog(task_dir / "log.jsonl", d.is_main, fresh=fresh)


def setup(cfg: FinetuneConfig, d: Dist) -> FinetuneRun:
    """The classifier, optimizer, random streams, checkpoints, log and wandb run of a new or resumed run."""
    spec = GLUE_TASKS[cfg.task]
    accum_steps = accumulation_per_rank(cfg.gradient_accumulation_steps, d)
    dtype = resolve_dtype(cfg.dtype, d.device)
    inputs = check_inputs(cfg)
    check_on_main(d, lambda: require_writable(cfg.task_dir()))  # before any work
    ckpt, resume = inputs.ckpt, cfg.init_from == "resume"
    batches = EpochBatches(inputs.train_set, cfg, d, accum_steps)
    torch.manual_seed(cfg.seed)  # identical head on every rank
    raw_model = build_model(ckpt, cfg, spec.n_outputs, resume=resume).to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {"nbhd": torch.Generator(device=d.device).manual_seed(stream_seed(cfg.seed, "nbhd", d.rank))}
    torch.manual_seed(stream_seed(cfg.seed, "dropout", d.rank))  # dropout differs per rank
    iter_num, evals_since_best, wandb_id, eval_pending = 0, 0, None, False
    best = {"loss": float("inf"), "iter": -1, "splits": None}
    if resume:
        iter_num, evals_since_best, wandb_id = ckpt["iter_num"], ckpt["evals_since_best"], ckpt.get("wandb_id")
        best = ckpt["best"]
        eval_pending = bool(ckpt.get("eval_pending", False))
    max_iters = batches.steps_per_epoch * cfg.max_epochs
    if cfg.max_iters:
        max_iters = min(max_iters, cfg.max_iters)
    eval_interval = cfg.eval_interval or batches.steps_per_epoch
    ckpts = RunCheckpoints(cfg.task_dir(), d, opt, generators, interval=eval_interval, start_iter=iter_num,
                           last_iter=max_iters)
    if resume:
        ckpts.restore(ckpt, cfg.seed, str(inputs.ckpt_file))
        print0(f"resumed from iteration {iter_num} ({inputs.ckpt_file})")
    record = {"tokenizer": ckpt["tokenizer"], "layout_source": ckpt["layout"]["source"], "data": ckpt["data"],
              "pretrained": inputs.pretrained}
    opt.wrap()

    log = start_log(cfg, d)
    train_set, val_sets, pretrained = inputs.train_set, inputs.val_sets, inputs.pretrained
    print0(f"finetuning {pretrained['path']} on {cfg.task}: {len(train_set):,} training examples "
           f"({train_set.truncated} cut to {cfg.max_length} tokens), "
           + ", ".join(f"{len(v):,} {s}" for s, v in val_sets.items())
           + (f"; resumed at step {iter_num}" if resume else ""))
    print0(f"device {d.device} x {d.world_size} rank(s), dtype {dtype}, {batches.steps_per_epoch} steps per epoch of "
           f"{batches.per_step} examples, at most {max_iters} steps; spatial weight "
           f"{raw_model.gpt.config.alpha_label()}; results in {cfg.task_dir()}")
    log.write(event="resume" if resume else "start", iter=iter_num, world_size=d.world_size, config=asdict(cfg),
              pretrained=pretrained, n_train=len(train_set), n_val={s: len(v) for s, v in val_sets.items()})
    wandb_run = start_wandb(cfg, cfg.task_dir(), run_id=wandb_id, enabled=d.is_main,
                            name=cfg.wandb_run_name or f"{cfg.task}-{Path(pretrained['path']).parent.name}")
    return FinetuneRun(cfg, d, raw_model, opt, generators, ckpts, log, wandb_run, batches, val_sets, record,
                       accum_steps, max_iters, eval_interval, iter_num, evals_since_best, best,
                       wandb_run.id or wandb_id, eval_pending)


# ----------------------------------------------------------------------------- the loop's steps

def micro_step(run: FinetuneRun, batch_index: Iterator[np.ndarray], model) -> tuple[torch.Tensor, dict]:
    """The next micro-batch of `batch_index` (EpochBatches.step_indices): the loss to minimise
    (model.GPT.combine_losses: task + alpha x spatial) and the statistics to log."""
    idx, lengths, labels = collate(run.batches.examples, next(batch_index), run.d.device)
    outputs, per_site = model(idx, lengths, units=run.raw_model.gpt.sample_units(run.generators["nbhd"]))
    losses = run.raw_model.gpt.combine_losses(task_loss(outputs, labels), per_site)
    return losses.total, {"task": losses.task, "spatial": losses.spatial}


def model_payload(run: FinetuneRun, it: int) -> dict:
    spec = GLUE_TASKS[run.cfg.task]
    return make_payload(run.raw_model.gpt, kind="finetune", config=asdict(run.cfg), iter_num=it,
                        head=run.raw_model.head.state_dict(),
                        task={"name": run.cfg.task, "n_outputs": spec.n_outputs,
                              "text_columns": list(spec.text_columns)},
                        **run.record)


def save_last(run: FinetuneRun, it: int) -> None:
    """ckpt-last.pt: everything a resumed run needs (weights, optimizer, best so far, patience, random streams)."""
    run.ckpts.save(run.cfg.task_dir() / "ckpt-last.pt", model_payload(run, it), best=run.best,
                   evals_since_best=run.evals_since_best, wandb_id=run.wandb_id, eval_pending=run.eval_pending)


def evaluate_and_log(run: FinetuneRun, it: int, stop: StopFlag) -> bool:
    """Evaluate every validation split, log, count patience; a new best is saved as ckpt-best.pt, with its
    predictions. False: a stop was requested during the evaluation, which is abandoned (nothing logged,
    patience and best unchanged)."""
    cfg, d = run.cfg, run.d
    results = {}
    for s, ex in run.val_sets.items():
        results[s] = evaluate(run.raw_model, ex, cfg, d, run.opt.ctx, stop)
        if results[s] is None:
            print0(f"stop requested during the evaluation at step {it}: evaluation abandoned")
            return False
    splits = {s: {"loss": r["task"], "spatial": r["spatial"], "n": len(run.val_sets[s]),
                  **compute_metrics(cfg.task, r["pred"], run.val_sets[s].labels)} for s, r in results.items()}
    watched = results[GLUE_TASKS[cfg.task].val_splits[0]]["task"]
    improved = watched < run.best["loss"]
    run.evals_since_best = 0 if improved else run.evals_since_best + 1
    text = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n")
                     for s, m in splits.items())
    print0(f"eval at step {it}: {text}{' (best)' if improved else ''}")
    run.log.write(event="eval", iter=it, splits=splits, improved=improved)
    run.wandb.log({f"{s}/{k}": v for s, m in splits.items() for k, v in m.items()}, step=it)
    if improved:
        run.best.update(loss=watched, iter=it, splits=splits)
        run.ckpts.save(cfg.task_dir() / "ckpt-best.pt", model_payload(run, it), resumable=False,
                       best_val_loss=watched)
        if d.is_main:
            write_predictions(cfg.task_dir(), {s: r["pred"] for s, r in results.items()}, run.val_sets)
    return True


def log_step(run: FinetuneRun, it: int, lr: float, step: StepResult, dt: float) -> None:
    """Print and log optimizer step `it`, which took `dt` seconds."""
    task, spatial = step.stats["task"], step.stats["spatial"]
    print0(f"iter {it} (epoch {it / run.batches.steps_per_epoch:.2f}): loss {task + spatial:.4f} (task {task:.4f}, "
           f"spatial {spatial:.4f}), {dt * 1000:.0f} ms/iter" + (" (step skipped)" if step.skipped else ""))
    run.log.write(event="train", iter=it, task=task, spatial=spatial, lr=lr, grad_norm=step.grad_norm,
                  skipped=step.skipped, loss_scale=step.loss_scale, dt=dt)


def finish(run: FinetuneRun) -> None:
    """After the last step: the best model's metrics, the ranks' agreement, and no ckpt-last.pt left to resume."""
    cfg, d, best = run.cfg, run.d, run.best
    steps_per_epoch = run.batches.steps_per_epoch
    reason = "max_iters" if run.max_iters < steps_per_epoch * cfg.max_epochs else "max_epochs"
    if run.patience_exhausted:
        reason = "early stopping"
    digests = gather_objects(params_digest(run.raw_model), d)
    if d.ddp and len(set(digests)) != 1:
        raise UserError("ranks ended with different weights")
    task_dir = cfg.task_dir()
    if d.is_main:
        write_metrics(task_dir, cfg, best, run.iter_num, steps_per_epoch, reason, run.record["pretrained"])
        (task_dir / "ckpt-last.pt").unlink(missing_ok=True)  # the run is complete: nothing left to resume
    run.log.write(event="end", iter=run.iter_num, reason=reason, best_iter=best["iter"], param_sha256=digests)
    print0(f"{reason} after {run.iter_num} steps; best at step {best['iter']}: "
           f"{cfg.task} score {task_score(cfg.task, best['splits']):.4f}; wrote {task_dir / 'metrics.json'}")


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> None:
    run_distributed(load_config(FinetuneConfig, argv, default_file="finetune_glue.yaml"), finetune)


def finetune(cfg: FinetuneConfig, d: Dist) -> None:
    stop = StopFlag()  # before setup: a stop while the data and model load is honoured at the first check
    try:
        run = setup(cfg, d)
        try:
            if finetune_loop(run, stop):
                stop_and_save(run)
            else:
                finish(run)
        finally:
            run.wandb.finish()
    finally:
        stop.restore()


def finetune_loop(run: FinetuneRun, stop: StopFlag) -> bool:
    """Train to max_iters or early stopping, evaluating every eval_interval steps and after the last one.
    True when a stop was requested: after a step, or during an evaluation, which is then abandoned and
    left pending (`run.eval_pending`, kept in ckpt-last.pt), so a resumed run does it first."""
    cfg = run.cfg
    t0 = time.time()
    while True:
        if run.eval_pending:
            if not evaluate_and_log(run, run.iter_num, stop):
                return True
            run.eval_pending = False
            if run.ckpts.due(run.iter_num):
                save_last(run, run.iter_num)
        if run.iter_num >= run.max_iters or run.patience_exhausted:
            break
        it = run.iter_num
        lr = learning_rate_at(it, cfg)
        micro = partial(micro_step, run, iter(run.batches.step_indices(it)))
        step = run.opt.step(it, lr, run.accum_steps, micro, CHECKS, stop.requested)
        run.iter_num += 1
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if it % cfg.log_interval == 0:
            log_step(run, it, lr, step, dt)
        run.eval_pending = run.iter_num % run.eval_interval == 0 or run.iter_num == run.max_iters
        if step.stop:
            return True
    return run.best["splits"] is None and not evaluate_and_log(run, run.iter_num, stop)


def stop_and_save(run: FinetuneRun) -> None:
    """ckpt-last.pt at the last completed step (with any evaluation still pending), then exit (status 0)."""
    cfg = run.cfg
    save_last(run, run.iter_num)
    again = resume_command(out_dir=cfg.out_dir, task=cfg.task, **OVERWRITE_OFF if cfg.overwrite else {})
    print0(f"stop requested: saved {cfg.task_dir() / 'ckpt-last.pt'} at step {run.iter_num}; continue with: {again}")
    run.log.write(event="stopped", iter=run.iter_num)


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
