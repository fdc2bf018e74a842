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
- The optimizer step (AdamW, autocast, grad scaler, DDP, non-finite checks) is train.Optimization,
  shared with pretraining; the checkpoint has pretraining's format plus `head` and `task`, so
  sample.py and any analysis that loads a GPT also load a finetuned backbone.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from common import (EOT_TOKEN, Dist, SystemConfig, UserError, cleanup_distributed, cli_main, find_checkpoint,
                    gpt2_encoding, load_checkpoint, load_config, one_of, print0, require, setup_distributed)
from model import GPT, GPTConfig, SequenceClassifier
from train import (JsonLog, Optimization, StopSignal, gather_objects, learning_rate_at, params_digest,
                   resolve_dtype, save_run_checkpoint, set_rng_state)


# ----------------------------------------------------------------------------- tasks and metrics

class GlueTask(NamedTuple):
    text_columns: tuple[str, ...]  # one column, or the two columns of a sentence pair
    n_outputs: int  # classes, or 1 for regression
    metrics: tuple[str, ...]
    val_splits: tuple[str, ...]


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), 2, ("mcc",), ("validation",)),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",), ("validation",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("validation",)),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "accuracy"), ("validation",)),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman"), ("validation",)),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",), ("validation",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
}


def matthews_corr(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when a marginal is constant."""
    classes = np.union1d(pred, gold)
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(conf, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
    t, p, n, correct = conf.sum(1), conf.sum(0), conf.sum(), np.trace(conf)
    denom = math.sqrt((n * n - t @ t) * (n * n - p @ p))
    return float((correct * n - t @ p) / denom) if denom > 0 else 0.0


def f1_positive(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def compute_metrics(task: str, pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    out = {}
    for name in GLUE_TASKS[task].metrics:
        if name == "mcc":
            out[name] = matthews_corr(pred, gold)
        elif name == "accuracy":
            out[name] = float(np.mean(pred == gold))
        elif name == "f1":
            out[name] = f1_positive(pred, gold)
        elif name == "pearson":
            out[name] = pearson(pred.astype(np.float64), gold.astype(np.float64))
        elif name == "spearman":
            out[name] = pearson(average_ranks(pred), average_ranks(gold))
    return out


def task_score(task: str, splits: dict[str, dict[str, float]]) -> float:
    """One number per task, as on the GLUE leaderboard: the mean of its metrics (and, for MNLI,
    of matched and mismatched)."""
    values = [splits[s][m] for s in GLUE_TASKS[task].val_splits for m in GLUE_TASKS[task].metrics]
    return float(np.mean(values))


# ----------------------------------------------------------------------------- config

@dataclass
class FinetuneConfig(SystemConfig):
    # ---- what to finetune, on what
    ckpt: str = ""
    """Pretrained checkpoint (a train.py ckpt-*.pt), or a run folder whose newest checkpoint is used."""
    task: str = "cola"
    """GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli."""
    data_dir: str = ""
    """Folder with one subfolder per task holding <split>.parquet/.jsonl/.tsv files with the GLUE
    columns; empty loads nyu-mll/glue through datasets (the Hub, or its local cache)."""
    max_length: int = 128
    """Tokens per example; longer examples are cut (pairs longest-first). At most the model's block_size."""
    max_train_examples: int = 0
    """Use only the first this many training examples (0: all); validation always uses every example."""
    init_from: str = "pretrained"
    """'pretrained' starts from `ckpt`; 'resume' continues a stopped run from out_dir/<task>/ckpt-last.pt."""
    # ---- output
    out_dir: str = "finetuned"
    """Results go to out_dir/<task>/."""
    overwrite: bool = False
    """Replace the results of an earlier finetuning in out_dir/<task>/ (refused otherwise)."""
    log_interval: int = 10
    """Print and log the training loss every this many iterations."""
    wandb_project: str = "topolm-glue"
    """wandb project name."""
    wandb_run_name: str = ""
    """wandb run name; empty uses <task>-<checkpoint run folder>."""
    # ---- model
    dropout: float = 0.1
    """Dropout in the GPT and before the head."""
    alpha_scale: float = 1.0
    """Spatial loss weight during finetuning = alpha_scale x the checkpoint's alpha; 0 turns it off."""
    # ---- optimization
    batch_size: int = 64
    """Examples per micro-batch and rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, in total over all ranks (must divide by the rank count)."""
    learning_rate: float = 2e-5
    """Peak (or constant) learning rate."""
    decay_lr: bool = False
    """Linear warmup then cosine decay to min_lr; False keeps learning_rate constant (the paper)."""
    warmup_iters: int = 0
    """Warmup steps (with decay_lr)."""
    lr_decay_iters: int = 10000
    """Step at which the cosine reaches min_lr (with decay_lr)."""
    min_lr: float = 2e-6
    """Final learning rate (with decay_lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    max_epochs: int = 10
    """Passes over the training set at most."""
    max_iters: int = 0
    """Optimizer steps at most (0: no limit besides max_epochs)."""
    eval_interval: int = 0
    """Evaluate on the full validation set every this many steps; 0 evaluates after every epoch."""
    patience: int = 3
    """Stop after this many evaluations without a new best validation task loss."""
    # ---- system: backend, device, dtype, compile, seed, nonfinite and wandb_log come from common.SystemConfig

    def __post_init__(self):
        require(bool(self.ckpt), "ckpt= is required: a checkpoint file or run folder made by train.py")
        one_of(self.task, "task", GLUE_TASKS)
        one_of(self.init_from, "init_from", ("pretrained", "resume"))
        for key in ("max_length", "batch_size", "gradient_accumulation_steps", "max_epochs", "patience",
                    "log_interval"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        for key in ("max_train_examples", "max_iters", "eval_interval", "warmup_iters", "lr_decay_iters",
                    "learning_rate", "min_lr", "weight_decay", "grad_clip", "alpha_scale"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        require(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        super().__post_init__()

    def task_dir(self) -> Path:
        return Path(self.out_dir) / self.task


# ----------------------------------------------------------------------------- data

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".tsv")


@dataclass
class Examples:
    """Tokenized examples of one split: token ids per example and the labels."""
    ids: list[np.ndarray]
    labels: np.ndarray  # int64 class ids, or float32 scores for regression
    truncated: int = 0  # examples cut to max_length

    def __len__(self) -> int:
        return len(self.ids)


def _local_split(folder: Path, split: str):
    import datasets

    datasets.disable_progress_bars()  # a local GLUE file loads in well under a second
    found = [folder / f"{split}{s}" for s in DATA_SUFFIXES if (folder / f"{split}{s}").is_file()]
    if not found:
        raise UserError(f"no {split} file in {folder} (expected {split}.parquet, .jsonl or .tsv)")
    path = found[0]
    try:
        if path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if path.suffix == ".tsv":  # QUOTE_NONE: GLUE sentences contain unbalanced quotes
            return datasets.load_dataset("csv", data_files=str(path), split="train", delimiter="\t", quoting=3)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def load_glue(task: str, data_dir: str) -> dict:
    """The task's train and validation split(s) as `datasets.Dataset`s, from local files or the Hub."""
    spec = GLUE_TASKS[task]
    splits = ("train",) + spec.val_splits
    if data_dir:
        folder = Path(data_dir) / task
        if not folder.is_dir():
            raise UserError(f"data folder not found: {folder} (data_dir holds one folder per task)")
        raw = {s: _local_split(folder, s) for s in splits}
        where = str(folder)
    else:
        import datasets
        try:
            hub = datasets.load_dataset("nyu-mll/glue", task)
        except Exception as e:
            raise UserError(f"cannot load nyu-mll/glue/{task} through datasets ({str(e).splitlines()[0]}); "
                            f"offline, point data_dir at local GLUE-format files") from e
        raw = {s: hub[s] for s in splits}
        where = f"nyu-mll/glue/{task}"
    for split, ds in raw.items():
        missing = [c for c in spec.text_columns + ("label",) if c not in ds.column_names]
        if missing:
            raise UserError(f"{where} {split}: missing column(s) {', '.join(missing)} for {task} "
                            f"(has {', '.join(ds.column_names)})")
    return raw


def join_pair(a: list[int], b: list[int] | None, max_length: int) -> tuple[list[int], bool]:
    """One example's token ids: a, or a + EOT + b; cut to max_length (pairs longest-first)."""
    if b is None:
        return a[:max_length], len(a) > max_length
    budget = max_length - 1
    if len(a) + len(b) <= budget:
        return a + [EOT_TOKEN] + b, False
    if len(a) <= budget // 2:
        keep_a, keep_b = len(a), budget - len(a)
    elif len(b) <= budget // 2:
        keep_a, keep_b = budget - len(b), len(b)
    else:
        keep_a, keep_b = budget - budget // 2, budget // 2
    return a[:keep_a] + [EOT_TOKEN] + b[:keep_b], True


def tokenize(ds, task: str, max_length: int, limit: int = 0, where: str = "") -> Examples:
    spec = GLUE_TASKS[task]
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    enc = gpt2_encoding()
    columns = [[("" if t is None else str(t)) for t in list(ds[c])] for c in spec.text_columns]
    encoded = [enc.encode_ordinary_batch(texts) for texts in columns]
    try:
        labels = np.asarray(list(ds["label"]), dtype=np.float32 if spec.n_outputs == 1 else np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: labels must be numbers as in nyu-mll/glue ({e})") from e
    if spec.n_outputs > 1:
        bad = ~np.isin(labels, np.arange(spec.n_outputs))
        if bad.any():
            raise UserError(f"{where}: label {labels[bad][0]:g} is not a class of {task} "
                            f"(0..{spec.n_outputs - 1}; the unlabeled test split cannot be used)")
        labels = labels.astype(np.int64)
    elif not np.isfinite(labels).all():
        raise UserError(f"{where}: non-finite regression label")
    ids, truncated = [], 0
    for i in range(len(ds)):
        toks, cut = join_pair(encoded[0][i], encoded[1][i] if len(encoded) > 1 else None, max_length)
        ids.append(np.asarray(toks or [EOT_TOKEN], dtype=np.int64))  # an empty text still needs one token
        truncated += cut
    return Examples(ids, labels, truncated)


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
    cfg: FinetuneConfig = load_config(FinetuneConfig, argv, default_file="finetune_glue.yaml")
    d = setup_distributed(cfg.device, cfg.backend)
    try:
        finetune(cfg, d)
    finally:
        cleanup_distributed(d)


def build_model(ckpt: dict, cfg: FinetuneConfig, n_outputs: int, resume: bool) -> SequenceClassifier:
    """The classifier from a pretrained checkpoint (dropout and alpha set for finetuning, a new head),
    or from a finetuning run's ckpt-last.pt (whose config already has them, and its head)."""
    model_config = dict(ckpt["model_config"])
    if not resume:
        model_config.update(dropout=cfg.dropout, alpha=model_config["alpha"] * cfg.alpha_scale)
    gpt = GPT(GPTConfig(**model_config))
    gpt.load_state_dict(ckpt["model"])  # weights and unit positions
    model = SequenceClassifier(gpt, n_outputs, cfg.dropout)
    if resume:
        model.head.load_state_dict(ckpt["head"])
    return model


RESUME_KEYS = ("task", "data_dir", "max_length", "max_train_examples", "batch_size", "gradient_accumulation_steps",
               "dropout", "alpha_scale", "seed")  # a resumed run must see the same data, order and model


def finetune(cfg: FinetuneConfig, d: Dist) -> None:
    spec = GLUE_TASKS[cfg.task]
    if cfg.gradient_accumulation_steps % d.world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible "
                        f"by the {d.world_size} ranks")
    accum_steps = cfg.gradient_accumulation_steps // d.world_size
    dtype = resolve_dtype(cfg.dtype, d.device)
    task_dir = cfg.task_dir()
    last_file = task_dir / "ckpt-last.pt"

    # Everything that can refuse the run is checked before anything is written.
    if cfg.init_from == "resume":
        if not last_file.is_file():
            raise UserError(f"init_from=resume but {task_dir} holds no ckpt-last.pt (a run that ended "
                            f"normally leaves none)")
        ckpt = load_checkpoint(last_file)
        saved = ckpt["config"]
        diff = [f"{k}={saved.get(k)!r} before vs {getattr(cfg, k)!r} now" for k in RESUME_KEYS
                if saved.get(k) != getattr(cfg, k)]
        if diff:
            raise UserError(f"cannot resume {last_file} with other settings: {'; '.join(diff)}")
        ckpt_file, pretrained = last_file, ckpt["pretrained"]
    else:
        earlier = [p.name for p in (task_dir / "ckpt-best.pt", task_dir / "metrics.json", last_file) if p.exists()]
        if earlier and not cfg.overwrite:
            hint = "init_from=resume to continue it, " if last_file.exists() else ""
            raise UserError(f"{task_dir} already holds {', '.join(earlier)}; pass {hint}overwrite=true to replace "
                            f"it, or another out_dir")
        ckpt_file = find_checkpoint(cfg.ckpt)
        ckpt = load_checkpoint(ckpt_file)
        if "head" in ckpt:
            print0(f"note: {ckpt_file} is itself finetuned; its head is dropped and a new one trained")
        pretrained = {"path": str(ckpt_file), "iter_num": ckpt.get("iter_num"), "alpha": ckpt["model_config"]["alpha"]}
    block_size, vocab_size = ckpt["model_config"]["block_size"], ckpt["model_config"]["vocab_size"]
    if cfg.max_length > block_size:
        raise UserError(f"max_length={cfg.max_length} exceeds the checkpoint's block_size={block_size}")
    if vocab_size <= EOT_TOKEN:
        raise UserError(f"checkpoint {ckpt_file} has vocab_size={vocab_size}; GLUE text needs the GPT-2 "
                        f"vocabulary (at least {EOT_TOKEN + 1})")
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
                        f"{per_step} (batch_size x gradient_accumulation_steps)")

    torch.manual_seed(cfg.seed)  # identical head on every rank
    raw_model = build_model(ckpt, cfg, spec.n_outputs, resume=cfg.init_from == "resume").to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {"nbhd": torch.Generator(device=d.device).manual_seed(cfg.seed + 1_000_003 * (d.rank + 1))}
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank
    iter_num, evals_since_best, wandb_id = 0, 0, None
    best = {"loss": float("inf"), "iter": -1, "splits": None}
    if cfg.init_from == "resume":
        opt.load_state_dict(ckpt)
        iter_num, evals_since_best, wandb_id = ckpt["iter_num"], ckpt["evals_since_best"], ckpt.get("wandb_id")
        best = ckpt["best"]
        if ckpt["world_size"] == d.world_size:
            set_rng_state(ckpt["rng"][d.rank], generators, d.device)
        else:
            print0(f"warning: {last_file} was written by {ckpt['world_size']} ranks, now {d.world_size}: random "
                   f"streams are re-seeded, so the run continues but not bit-exactly")
    del ckpt
    opt.wrap()
    max_iters = steps_per_epoch * cfg.max_epochs
    if cfg.max_iters:
        max_iters = min(max_iters, cfg.max_iters)
    eval_interval = cfg.eval_interval or steps_per_epoch

    task_dir.mkdir(parents=True, exist_ok=True)
    log = JsonLog(task_dir / "log.jsonl", d.is_main)
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
    wandb_run = None
    if cfg.wandb_log and d.is_main:
        import wandb
        wandb_run = wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(task_dir), id=wandb_id,
                               resume="allow", name=cfg.wandb_run_name or f"{cfg.task}-{Path(pretrained['path']).parent.name}")
        wandb_id = wandb_run.id

    def model_payload(it: int) -> dict:
        return {
            "format": "topolm-ckpt-v1",
            "model": raw_model.gpt.state_dict(),
            "model_config": asdict(raw_model.gpt.config),
            "head": raw_model.head.state_dict(),
            "task": {"name": cfg.task, "n_outputs": spec.n_outputs, "text_columns": list(spec.text_columns)},
            "config": asdict(cfg),
            "pretrained": pretrained,
            "iter_num": it,
        }

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

    def micro_step(model):
        idx, lengths, labels = collate(train_set, next(batch_index), d.device)
        outputs, per_site = model(idx, lengths, units=raw_model.gpt.sample_units(generators["nbhd"]))
        losses = raw_model.gpt.combine_losses(task_loss(outputs, labels), per_site)
        return losses.total, torch.stack([losses.task, losses.spatial])

    stop = StopSignal()
    reason = "max_iters" if max_iters < steps_per_epoch * cfg.max_epochs else "max_epochs"
    t0 = time.time()
    try:
        while iter_num < max_iters and not (best["iter"] >= 0 and evals_since_best >= cfg.patience):
            lr = learning_rate_at(iter_num, cfg)
            batch_index = step_batches(iter_num)
            stats, grad_norm, skipped, stop_now = opt.step(iter_num, lr, accum_steps, micro_step,
                                                           ["task", "spatial"], stop.requested)
            iter_num += 1
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if (iter_num - 1) % cfg.log_interval == 0:
                print0(f"iter {iter_num - 1} (epoch {(iter_num - 1) / steps_per_epoch:.2f}): loss "
                       f"{stats[0] + stats[1]:.4f} (task {stats[0]:.4f}, spatial {stats[1]:.4f}), {dt * 1000:.0f} ms/iter")
                log.write(event="train", iter=iter_num - 1, task=stats[0], spatial=stats[1], lr=lr,
                          grad_norm=grad_norm, skipped=skipped, dt=dt)
            eval_due = iter_num % eval_interval == 0 or iter_num == max_iters
            if eval_due:
                run_eval(iter_num)
            if eval_due or stop_now:
                save_last(iter_num)
            if stop_now:
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


def write_predictions(task_dir: Path, preds: dict[str, np.ndarray], val_sets: dict) -> None:
    for split, pred in preds.items():
        labels = val_sets[split].labels
        lines = "".join(json.dumps({"index": i, "prediction": p, "label": lab}) + "\n"
                        for i, (p, lab) in enumerate(zip(pred.tolist(), labels.tolist())))
        _atomic_text(task_dir / f"predictions-{split}.jsonl", lines)


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
    _atomic_text(task_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    cli_main(main)
