"""Pretrain a topographic GPT-2 (TopoLM): task cross-entropy + alpha_site * spatial loss per site.

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

import dataclasses
import time
from functools import partial
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from topolm.checkpoint import (checkpoint_path, data_record, list_checkpoints, load_checkpoint, load_source,
                               make_payload, require_permutation_layout, tokenizer_for)
from topolm.config import (DATA_DIR, POSITIONS_DIR, LoopConfig, UserError, cli_main, command_line_keys, load_config,
                           require, resolve_path)
from topolm.distributed import Dist, check_on_main, print0, run_distributed
from topolm.files import open_tokens, remove_partial_writes, require_writable, tokens_meta
from topolm.corpus import token_ids_used
from model import ARCH_KEYS, GPT, GPTConfig
from topolm.position_sets import MODEL_KEYS, initial_weights_digest, load_positions, match_model_record, read_meta
from positions import random_layout, sheet_shape
from topolm.signals import StopFlag
from topolm.topography import TopographyKeys, TrainingHook
from topolm.training import (JsonLog, Optimization, RunCheckpoints, StepResult, accumulation_per_rank,
                             alpha_factor_at, check_wandb, eval_seeds, gather_objects, learning_rate_at, params_digest,
                             peak_flops, reduce_with_stop, resolve_dtype, resume_command, start_wandb, stream_seed)


@dataclass
class TrainConfig(LoopConfig, GPTConfig, TopographyKeys):
    """train.py's keys: its own below, the model's from model.GPTConfig, the optimizer's, batches',
    logging and system keys from topolm.config.LoopConfig, the topography measured at each evaluation from
    topolm.topography.TopographyKeys (each declared once, with its docstring, there)."""
    # ---- I/O
    out_dir: str = "out"
    """Folder that holds run folders; each run writes into out_dir/<run name>."""
    run_name: str = ""
    """Run folder name under out_dir; empty derives one from dataset, the site weights (GPTConfig.alpha_label)
    and size."""
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
    keep_every: int = 0
    """With keep_last: keep also, beyond the newest keep_last, every n-th periodic checkpoint (those whose iteration
    is a multiple of keep_every x save_interval), e.g. for development.py's maps over training; 0: none."""
    init_from: str = "scratch"
    """'scratch' starts a new run from random weights; 'resume' continues from the run folder's newest
    checkpoint. Any other value is a path: a checkpoint file, a run folder (its newest checkpoint), a
    finetuned folder (its backbone) or a Hugging Face GPT2LMHeadModel folder (an export_hf.py export or
    any GPT-2 whose config.json fits model.py), whose weights start a new run with a fresh optimizer at
    step 0. The run takes that model's shape (block_size, vocab_size, n_layer, n_head, n_embed, bias,
    activation; one set to another value on the command line is refused) and its unit positions, unless
    position_dir gives new ones (positions that are not a permutation of the grid need new ones). (A
    path named 'scratch' or 'resume' is written ./scratch or ./resume.)"""
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
    """Position set (init_pos.py output); a bare name means gpt2-positions/<name>; empty draws a random layout from
    `seed`. A swapopt set optimized for the model of seed S makes S the run's seed unless `seed` is given on the
    command line (another seed there is refused), and a run whose shape keys differ from that model's is refused."""
    # ---- length of the run
    max_iters: int = 600000
    """Optimizer steps in the whole run (0 with eval_only)."""
    # ---- the spatial loss's weight over the steps
    alpha_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Factor on every site's weight (alpha, alpha_attn, alpha_mlp, alpha_sites) at optimizer step it
    (topolm.training.alpha_factor_at): 'constant' 1; 'linear' a warm-up it / alpha_warmup_iters up to 1 at
    alpha_warmup_iters, then 1; 'cosine' the same warm-up (none with alpha_warmup_iters=0), then
    alpha_final + (1 - alpha_final) * (1 + cos(pi * (it - alpha_warmup_iters) / (alpha_decay_iters -
    alpha_warmup_iters))) / 2, then alpha_final from alpha_decay_iters on. Logged every step (log.jsonl:
    alpha_factor and the weights alpha_sites; wandb: alpha_factor); evaluations use the factor of their step."""
    alpha_warmup_iters: int = 0
    """Steps of the linear warm-up of alpha_schedule=linear (>= 1) or cosine (0: none)."""
    alpha_decay_iters: int = 0
    """alpha_schedule=cosine: the step at which the cosine reaches alpha_final (> alpha_warmup_iters)."""
    alpha_final: float = 0.0
    """alpha_schedule=cosine: the factor from alpha_decay_iters on, in [0, 1]."""

    def __post_init__(self):
        super().__post_init__()  # the model's, optimizer's, loop's and system keys
        for key in ("eval_interval", "eval_iters", "save_interval"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        for key in ("keep_last", "keep_every", "max_iters"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        require(self.radius >= 2 or not self.spatial_sites,
                f"radius={self.radius} gives one-unit neighborhoods, which have no pairs to correlate; use "
                f"radius >= 2 (or alpha=0 for the control)")
        for key in ("alpha_warmup_iters", "alpha_decay_iters"):
            require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0")
        require(0.0 <= self.alpha_final <= 1.0, f"alpha_final={self.alpha_final} must be in [0, 1]")
        require(self.alpha_schedule != "linear" or self.alpha_warmup_iters >= 1,
                "alpha_schedule=linear needs alpha_warmup_iters >= 1 (the steps of its warm-up)")
        require(self.alpha_schedule != "cosine" or self.alpha_decay_iters > self.alpha_warmup_iters,
                f"alpha_schedule=cosine needs alpha_decay_iters > alpha_warmup_iters={self.alpha_warmup_iters} "
                f"(the step at which the decay ends); got alpha_decay_iters={self.alpha_decay_iters}")
        require(bool(self.dataset), "dataset= is empty; name a folder with train.bin and val.bin")
        require(bool(self.init_from), "init_from= is empty; use scratch, resume or the path of a model to start from")
        require(self.run_name == "" or self.run_name.strip("./") != "",
                f"run_name='{self.run_name}' is not a folder name")
        require(self.keep_every == 0 or self.keep_last > 0,
                f"keep_every={self.keep_every} needs keep_last > 0 (keep_last=0 keeps every checkpoint already)")
        require(self.n_output_ids == 0, f"n_output_ids={self.n_output_ids}: train.py derives it from the data; "
                                        f"set output_vocab=corpus instead")

    @property
    def from_model(self) -> bool:
        """Whether init_from names a model whose weights start the run."""
        return self.init_from not in ("scratch", "resume")

    def model_config(self, n_output_ids: int = 0) -> GPTConfig:
        """The model's config; n_output_ids: the size of a restricted output vocabulary (0: all ids)."""
        keys = {f.name: getattr(self, f.name) for f in fields(GPTConfig)}
        return GPTConfig(**{**keys, "n_output_ids": n_output_ids})

    def run_dir(self) -> Path:
        name = self.run_name or (
            f"{Path(self.dataset).name}-{'topo' if self.spatial_sites else 'control'}"
            f"-L{self.n_layer}-E{self.n_embed}-{self.alpha_label()}-r{self.radius}")
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

def positions_for(cfg: TrainConfig) -> tuple[np.ndarray, str, dict]:
    """A new run's unit positions, where they come from, and their set's meta.json ({} if none)."""
    if not cfg.position_dir:
        return random_layout(2 * cfg.n_layer, cfg.n_embed, cfg.seed, cfg.sheet), f"random(seed={cfg.seed})", {}
    folder = resolve_path(cfg.position_dir, POSITIONS_DIR)
    try:
        coords, meta = load_positions(folder, cfg.n_layer, cfg.n_embed, cfg.sheet)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    return coords, f"{folder} ({meta.get('layout', '?')})", meta


def seed_for_positions(cfg: TrainConfig, seed_given: bool) -> TrainConfig:
    """The config with the seed of the model a new run's swapopt position set was optimized for
    (topolm.position_sets.match_model_record: adopted unless `seed` was given on the command line,
    refused when that differs). A missing or unreadable set is left to positions_for to report."""
    if not cfg.position_dir or cfg.init_from != "scratch":
        return cfg
    folder = resolve_path(cfg.position_dir, POSITIONS_DIR)
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError):
        return cfg
    model = {k: getattr(cfg, k) for k in MODEL_KEYS}
    seed, message = match_model_record(meta, folder, model, cfg.seed, seed_given)
    if message:
        print0(message)
    return cfg if seed == cfg.seed else dataclasses.replace(cfg, seed=seed)


def check_initial_weights(raw_model: GPT, meta: dict, cfg: TrainConfig) -> None:
    """Warn when the model built here is not the one the position set was optimized for although seed and
    shape keys match (another torch version draws other initial weights)."""
    record = meta.get("optimized_for")
    if not isinstance(record, dict) or "seed" not in record or record["seed"] != cfg.seed:
        return
    if record.get("weights_sha256") not in (None, initial_weights_digest(raw_model)):
        print0(f"warning: the model seed={cfg.seed} initialises here is not the one position set {cfg.position_dir} "
               f"was optimized for (its weights digest differs: another torch version?), so the layout's head "
               f"start may not carry over; re-run init_pos.py here")


def check_resume_config(ckpt: dict, cfg: TrainConfig, path: Path, n_output_ids: int) -> None:
    saved = ckpt["model_config"]
    wanted = asdict(cfg.model_config(n_output_ids))
    diff = [f"{k}={saved.get(k)} in checkpoint vs {wanted[k]} now" for k in ARCH_KEYS if saved.get(k) != wanted[k]]
    theirs = sheet_shape(saved["n_embed"], saved.get("sheet_rows", 0)) if not diff else cfg.sheet
    if theirs != cfg.sheet:
        diff.append(f"a {theirs[0]}x{theirs[1]} sheet in checkpoint vs {cfg.sheet[0]}x{cfg.sheet[1]} now (sheet_rows)")
    if diff:
        raise UserError(f"checkpoint {path} was made for another architecture: {'; '.join(diff)}; set these keys "
                        f"as in the checkpoint, or start a new run with another run_name")


# ----------------------------------------------------------------------------- a run started from a model

# The keys that fix a model's weights' shapes and its function: a run started from a model takes them
SOURCE_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embed", "bias", "activation")
# The keys of the spatial loss's weights and their schedule (a checkpoint's `alpha` field records them)
ALPHA_KEYS = ("alpha", "alpha_attn", "alpha_mlp", "alpha_sites", "alpha_schedule", "alpha_warmup_iters",
              "alpha_decay_iters", "alpha_final")


def adopt_source_shape(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, tuple[dict, Path] | None]:
    """The config with the shape keys (SOURCE_KEYS) of the model init_from names, or with init_from=resume
    those of a run that was started from a model (its checkpoints record `started_from`), and what was
    loaded to read them ((checkpoint or model, its path), handed on to check_inputs so that it is not
    loaded twice; None when nothing was). Raises UserError when that model cannot be loaded, or when a
    key `given` on the command line sets another value."""
    if cfg.init_from == "resume":
        ckpts = list_checkpoints(cfg.run_dir())
        if not ckpts:
            return cfg, None  # check_inputs refuses it
        src, path = load_checkpoint(ckpts[-1]), ckpts[-1]
        if not src.get("started_from"):
            return cfg, (src, path)  # a run from random weights: its config is checked by check_inputs
    elif cfg.from_model:
        src, path = load_source(cfg.init_from)
    else:
        return cfg, None
    saved = src["model_config"]
    clash = [f"{k}={getattr(cfg, k)} on the command line vs {saved[k]} in the model" for k in SOURCE_KEYS
             if k in given and getattr(cfg, k) != saved[k]]
    adopted = {k: saved[k] for k in SOURCE_KEYS if getattr(cfg, k) != saved[k]}
    # kept positions (or a resume's) fix the sheet too; new ones (position_dir, or none in the folder) take the run's
    if cfg.init_from == "resume" or not (cfg.position_dir or not src.get("hf", {"positions": True})["positions"]):
        rows = sheet_shape(saved["n_embed"], saved.get("sheet_rows", 0))[0]
        try:
            ours = sheet_shape(saved["n_embed"], cfg.sheet_rows)[0]
        except ValueError:
            ours = None
        if ours != rows and "sheet_rows" in given:
            clash.append(f"sheet_rows={cfg.sheet_rows} on the command line vs the model's {rows}-row sheet (its "
                         f"positions are kept; new ones from position_dir may have another sheet)")
        elif ours != rows:
            adopted["sheet_rows"] = rows
    if clash:
        raise UserError(f"{path} is a model of another shape: {'; '.join(clash)}; leave these keys out "
                        f"(a run started from a model takes its shape) or start from another model")
    if adopted:
        print0(f"{path}: the run takes the model's {' '.join(f'{k}={v}' for k, v in adopted.items())}")
    try:
        return dataclasses.replace(cfg, **adopted), (src, path)
    except ValueError as e:  # the run's own keys (radius, neighborhoods) may not fit the model's sheet
        raise UserError(f"{path}: {e}") from e


def check_source_vocabulary(src: dict, path: Path, data_dir: Path, data_tokenizer: str) -> None:
    """Refuse a dataset whose token ids are of another tokenizer than the model's (the ids' range is
    checked against vocab_size when the token files open)."""
    theirs = (src.get("data") or {}).get("tokenizer") or (src.get("tokenizer") or {}).get("name")
    if theirs and theirs != data_tokenizer:
        raise UserError(f"init_from={path} is a model of {theirs} token ids, but {data_dir} holds {data_tokenizer} "
                        f"ids (its meta.json); train it on a dataset of its own tokenizer")


def source_positions(cfg: TrainConfig, src: dict, path: Path) -> tuple[np.ndarray, str, dict]:
    """A run started from a model: its unit positions, where they come from, and their set's meta.json.
    The model's own unless position_dir gives new ones (or a Hugging Face folder has none: then drawn
    from the seed, as for a new run). Raises UserError for a layout that is not a permutation."""
    if cfg.position_dir or not src.get("hf", {"positions": True})["positions"]:
        return positions_for(cfg)
    require_permutation_layout(src, path, "train.py", hint="; give the run new ones with position_dir=<a position "
                                                           "set made by init_pos.py>")
    return src["model"]["sheet.unit_coords"].numpy(), f"{src['layout']['source']} (kept from {path})", {}


def started_from(src: dict, path: Path, layout_source: str) -> dict:
    """The `started_from` field of a run's checkpoints and log: the model whose weights started it."""
    record = {"path": str(Path(path).resolve()), "kind": src["kind"], "iter_num": src["iter_num"],
              "format": "hf" if "hf" in src else src["format"], "layout": layout_source}
    if (src.get("hf") or {}).get("provenance"):
        record["provenance"] = src["hf"]["provenance"]
    return record


def load_source_weights(raw_model: GPT, src: dict, path: Path) -> None:
    """The weights of the model a run starts from, into `raw_model` (its own positions and output ids stay)."""
    state = {k: v for k, v in src["model"].items() if k not in ("sheet.unit_coords", "output_ids")}
    try:
        missing, unexpected = raw_model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"init_from={path}: the weights do not fit the run's model: {str(e).splitlines()[-1]}") from e
    missing = [k for k in missing if k not in ("sheet.unit_coords", "output_ids")]
    if missing or unexpected:
        raise UserError(f"init_from={path}: the weights do not fit the run's model (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")


def evaluate(model, raw_model: GPT, batches: dict[str, Batches], cfg: TrainConfig, d: Dist, ctx,
             stop: StopFlag | None = None) -> dict | None:
    """Per split: the mean of each field of model.Losses (total as "loss", task, spatial, per-site SL
    as "sites") over eval_iters batches per rank, averaged over ranks. Its generators are re-seeded
    identically at every evaluation (training.eval_seeds), so evaluations compare.

    `stop` is read after every batch (under DDP all-reduced with the batch's sums, so every rank leaves
    at the same batch); once it is set, the evaluation is abandoned and None returned."""
    model.eval()
    try:
        out = {}
        batch_seed, nbhd_seed = eval_seeds(cfg.seed, d.rank)
        for split, source in batches.items():
            g_batch = torch.Generator().manual_seed(batch_seed)
            g_nbhd = torch.Generator(device=d.device).manual_seed(nbhd_seed)
            sums = None
            with torch.no_grad():
                for _ in range(cfg.eval_iters):
                    x, y = source.get(g_batch)
                    with ctx:
                        _, losses = raw_model(x, y, units=raw_model.sample_units(g_nbhd), return_logits=False)
                    values = {name: v.detach().float() for name, v in losses._asdict().items()}
                    flat, stopped = reduce_with_stop(torch.cat([v.reshape(-1) for v in values.values()]), stop, d)
                    if stopped:
                        return None
                    sums = flat if sums is None else sums + flat
            parts = sums.split([v.numel() for v in values.values()])
            mean = {k: (part.view_as(v) / (cfg.eval_iters * d.world_size)).tolist()
                    for (k, v), part in zip(values.items(), parts)}
            out[split] = {"loss": mean["total"], "task": mean["task"], "spatial": mean["spatial"],
                          "sites": mean["per_site"]}
        return out
    finally:
        model.train()


# ----------------------------------------------------------------------------- the run's state

@dataclass
class Inputs:
    """What a run starts from, checked before anything is written."""
    batches: dict[str, Batches]
    output_ids: np.ndarray | None  # output_vocab=corpus: the ids the softmax runs over
    ckpt: dict | None  # the checkpoint a resume continues (None: a new run)
    ckpt_file: Path | None
    source: dict | None  # the model whose weights start a new run (init_from=<path>; None: random weights)
    source_path: Path | None
    coords: np.ndarray | None  # a new run's unit positions
    positions_meta: dict  # their set's meta.json ({} for a resume or a layout drawn from the seed)
    record: dict  # the payload fields that describe the model: tokenizer, layout source, data


@dataclass
class TrainRun:
    """Everything the loop reads and updates, passed explicitly to each of its steps."""
    cfg: TrainConfig
    d: Dist
    raw_model: GPT
    model: torch.nn.Module  # raw_model compiled and/or wrapped in DDP
    opt: Optimization
    batches: dict[str, Batches]
    generators: dict[str, torch.Generator]
    ckpts: RunCheckpoints
    log: JsonLog
    wandb: object  # a wandb run or training.NullRun
    record: dict
    accum_steps: int
    tokens_per_iter: int
    iter_num: int
    start_iter: int
    best_val_loss: float
    wandb_id: str | None
    peak: float | None  # the GPU's dense bf16 peak FLOP/s, for MFU (None on CPU)
    running_mfu: float = -1.0
    topography: TrainingHook | None = None  # the evaluations' topography (None: topography=false)

    @property
    def checks(self) -> dict:
        return {"task": "task", "sites": [f"spatial site {n}" for n in self.raw_model.site_names]}

    def micro_step(self, model) -> tuple[torch.Tensor, dict]:
        """One micro-batch of this rank's stream: the loss to minimise and the statistics to log."""
        x, y = self.batches["train"].get(self.generators["batch"])
        _, losses = model(x, y, units=self.raw_model.sample_units(self.generators["nbhd"]), return_logits=False)
        return losses.total, {"task": losses.task, "spatial": losses.spatial, "sites": losses.per_site}


# ----------------------------------------------------------------------------- setup

def check_inputs(cfg: TrainConfig, d: Dist, loaded: tuple[dict, Path] | None = None) -> Inputs:
    """Everything that can refuse the run, checked before anything is written. loaded: the checkpoint or
    model adopt_source_shape read (used instead of reading it again)."""
    data_dir = resolve_path(cfg.dataset, DATA_DIR)
    try:
        batches = {split: Batches(data_dir / f"{split}.bin", cfg, d.device) for split in ("train", "val")}
    except UserError as e:
        if not cfg.from_model:
            raise
        raise UserError(f"init_from={cfg.init_from} is a model of vocab_size={cfg.vocab_size} and "
                        f"block_size={cfg.block_size}, which the data must fit: {e}") from e
    output_ids = None
    if cfg.output_vocab == "corpus":
        output_ids = token_ids_used([source.path for source in batches.values()], cfg.vocab_size)
    run_dir = cfg.run_dir()
    ckpt = ckpt_file = coords = source = source_path = None
    positions_meta = {}
    data_tokenizer = tokens_meta(data_dir).get("tokenizer", "gpt2")
    origin = None
    if cfg.init_from == "resume":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"init_from=resume but {run_dir} holds no checkpoint; use init_from=scratch to start "
                            f"the run (or name the run folder with out_dir/run_name)")
        ckpt_file = ckpts[-1]
        ckpt = loaded[0] if loaded is not None and loaded[1] == ckpt_file else load_checkpoint(ckpt_file)
        check_resume_config(ckpt, cfg, ckpt_file, 0 if output_ids is None else len(output_ids))
        changed = [f"{k}={ckpt['config'].get(k)!r} before, {getattr(cfg, k)!r} now" for k in ALPHA_KEYS
                   if k in ckpt["config"] and ckpt["config"][k] != getattr(cfg, k)]
        if changed:
            print0(f"note: the spatial loss's weights or schedule differ from the checkpoint's ({'; '.join(changed)}): "
                   f"the run continues with the new ones from iteration {ckpt['iter_num']}")
        positions_source, origin = ckpt["layout"]["source"], ckpt.get("started_from")
    else:
        if cfg.from_model:
            source, source_path = loaded if loaded is not None else load_source(cfg.init_from)
            check_source_vocabulary(source, source_path, data_dir, data_tokenizer)
            coords, positions_source, positions_meta = source_positions(cfg, source, source_path)
            origin = started_from(source, source_path, positions_source)
        else:
            coords, positions_source, positions_meta = positions_for(cfg)
        if list_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints; use init_from=resume to continue it "
                            f"or another run_name/out_dir for a new run")
    record = {"tokenizer": tokenizer_for(cfg.vocab_size, data_tokenizer), "layout_source": positions_source,
              "data": data_record(cfg.dataset, data_dir, data_tokenizer), "started_from": origin}
    check_wandb(cfg)
    check_on_main(d, lambda: require_writable(run_dir))
    if cfg.eval_only and ckpt is None and source is None:
        print0("warning: eval_only=true with init_from=scratch evaluates a freshly initialised model; use "
               "init_from=resume to evaluate the run's newest checkpoint")
    return Inputs(batches, output_ids, ckpt, ckpt_file, source, source_path, coords, positions_meta, record)


def start_log(cfg: TrainConfig, d: Dist, fresh: bool) -> JsonLog:
    """The run folder, cleared of unfinished writes, and its log (a new run replaces a log left by an
    earlier run that saved no checkpoint; a resume appends)."""
    run_dir = cfg.run_dir()
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(run_dir)
        if fresh and (run_dir / "log.jsonl").exists():
            print0(f"note: {run_dir / 'log.jsonl'} of an earlier run that saved no checkpoint is replaced")
    return JsonLog(run_dir / "log.jsonl", d.is_main, fresh=fresh)


def setup(cfg: TrainConfig, d: Dist, loaded: tuple[dict, Path] | None = None) -> TrainRun:
    """The model, optimizer, random streams, checkpoints, log and wandb run of a new or resumed run."""
    accum_steps = accumulation_per_rank(cfg.gradient_accumulation_steps, d)
    dtype = resolve_dtype(cfg.dtype, d.device)
    inputs = check_inputs(cfg, d, loaded)
    topography = start_topography(cfg, d, inputs)
    ckpt, output_ids = inputs.ckpt, inputs.output_ids
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = GPT(cfg.model_config(0 if output_ids is None else len(output_ids)), inputs.coords,
                    output_ids)
    if inputs.source is not None:
        load_source_weights(raw_model, inputs.source, inputs.source_path)
        print0(f"starting from the weights of {inputs.source_path} ({inputs.source['kind']}, step "
               f"{inputs.source['iter_num']}) with a fresh optimizer")
    else:
        check_initial_weights(raw_model, inputs.positions_meta, cfg)
    raw_model = raw_model.to(d.device)
    opt = Optimization(raw_model, cfg, d, dtype)
    generators = {
        "batch": torch.Generator().manual_seed(stream_seed(cfg.seed, "batch", d.rank)),
        "nbhd": torch.Generator(device=d.device).manual_seed(stream_seed(cfg.seed, "nbhd", d.rank)),
    }
    torch.manual_seed(stream_seed(cfg.seed, "dropout", d.rank))  # dropout differs per rank
    iter_num, best_val_loss, wandb_id = 0, float("inf"), None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss, wandb_id = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("wandb_id")
    ckpts = RunCheckpoints(cfg.run_dir(), d, opt, generators, interval=cfg.save_interval, start_iter=iter_num,
                           last_iter=cfg.max_iters, keep_last=cfg.keep_last, always=cfg.always_save_checkpoint,
                           keep_every=cfg.keep_every)
    if ckpt is not None:
        ckpts.restore(ckpt, cfg.seed, "the checkpoint")
        print0(f"resumed from iteration {iter_num} ({inputs.ckpt_file})")
    model = opt.wrap()

    log = start_log(cfg, d, fresh=inputs.ckpt_file is None)
    tokens_per_iter = accum_steps * d.world_size * cfg.batch_size * cfg.block_size
    print0(f"run folder: {cfg.run_dir()}")
    print0(f"device {d.device} x {d.world_size} rank(s), dtype {dtype}, {raw_model.get_num_params() / 1e6:.2f}M "
           f"parameters, positions from {inputs.record['layout_source']}")
    print0(f"tokens per iteration: {tokens_per_iter:,} ({accum_steps} micro-steps x {d.world_size} ranks x "
           f"{cfg.batch_size} x {cfg.block_size})")
    log.write(event="resume" if cfg.init_from == "resume" else "start", iter=iter_num, world_size=d.world_size,
              config=asdict(cfg), started_from=inputs.record["started_from"])
    wandb_run = start_wandb(cfg, cfg.run_dir(), name=cfg.wandb_run_name or cfg.run_dir().name, run_id=wandb_id,
                            enabled=d.is_main)
    return TrainRun(cfg, d, raw_model, model, opt, inputs.batches, generators, ckpts, log, wandb_run, inputs.record,
                    accum_steps, tokens_per_iter, iter_num, iter_num, best_val_loss, wandb_run.id or wandb_id,
                    peak_flops(d.device), topography=topography)


# ----------------------------------------------------------------------------- the loop's steps

def alpha_record(cfg: TrainConfig, it: int) -> dict:
    """The checkpoint's `alpha` field after `it` steps: the schedule's keys, every site's weight
    (`sites`, before the factor) and the factor and weights of the last step taken (None at step 0)."""
    last = alpha_factor_at(it - 1, cfg) if it > 0 else None
    return {**{k: getattr(cfg, k) for k in ALPHA_KEYS}, "sites": cfg.site_alpha, "last_factor": last,
            "last_sites": None if last is None else [w * last for w in cfg.site_alpha]}


def set_alpha(run: TrainRun, it: int) -> float:
    """Put the schedule's factor of step `it` into the model (training and the evaluation at `it` use it)."""
    factor = alpha_factor_at(it, run.cfg)
    run.raw_model.set_alpha_factor(factor)
    return factor


def save(run: TrainRun, it: int) -> None:
    """The checkpoint after `it` steps: the model, and all a resume needs."""
    payload = make_payload(run.raw_model, kind="pretrain", config=asdict(run.cfg), iter_num=it,
                           alpha=alpha_record(run.cfg, it), **run.record)
    path = checkpoint_path(run.cfg.run_dir(), it)
    run.ckpts.save(path, payload, best_val_loss=run.best_val_loss, wandb_id=run.wandb_id)
    print0(f"saved checkpoint {path}")


def evaluate_and_log(run: TrainRun, it: int, stop: StopFlag) -> bool | None:
    """Evaluate, log, and say whether the validation loss is the best so far (recorded in run.best_val_loss).
    None: a stop was requested during the evaluation, which is abandoned (nothing logged)."""
    res = evaluate(run.model, run.raw_model, run.batches, run.cfg, run.d, run.opt.ctx, stop)
    if res is None:
        print0(f"stop requested during the evaluation at iteration {it}: evaluation abandoned")
        return None
    improved = res["val"]["loss"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, res["val"]["loss"])
    print0(f"step {it}: train loss {res['train']['loss']:.4f} (task {res['train']['task']:.4f}, spatial "
           f"{res['train']['spatial']:.4f}), val loss {res['val']['loss']:.4f} (task {res['val']['task']:.4f}, "
           f"spatial {res['val']['spatial']:.4f})")
    run.log.write(event="eval", iter=it, train=res["train"], val=res["val"], lr=learning_rate_at(it, run.cfg))
    run.wandb.log({"iter": it, **{f"{split}/{k}": res[split][k] for split in ("train", "val")
                                  for k in ("loss", "task", "spatial")},
                   **{f"val/sl/{n}": v for n, v in zip(run.raw_model.site_names, res["val"]["sites"])}}, step=it)
    measure_topography(run, it)
    return improved


# ----------------------------------------------------------------------------- the evaluations' topography

def start_topography(cfg: TrainConfig, d: Dist, inputs: Inputs) -> TrainingHook | None:
    """The evaluation hook of topolm.topography (its inputs read and checked before anything is written);
    None with topography=false."""
    gpt2_ids = (inputs.record["tokenizer"] or {}).get("name") == "gpt2"
    return TrainingHook.start(cfg, inputs.batches["val"].path, cfg.block_size, cfg.vocab_size, gpt2_ids, cfg.run_dir(),
                              d.is_main, say=print0)


def measure_topography(run: TrainRun, it: int) -> None:
    """The topography of the raw model after `it` steps, outside every collective: every rank measures the same
    weights on the same inputs (so the ranks stay in step without waiting for each other), rank 0 logs it."""
    if run.topography is not None:
        run.topography(run.raw_model, it, run.log, run.wandb, say=print0)


def log_step(run: TrainRun, it: int, lr: float, step: StepResult, dt: float, factor: float) -> None:
    """Print and log optimizer step `it`, which took `dt` seconds with the alpha schedule's `factor`; MFU as a
    running mean after 5 steps."""
    task, spatial = step.stats["task"], step.stats["spatial"]
    mfu_text = ""
    if run.peak and it + 1 - run.start_iter > 5:
        mfu = run.raw_model.estimate_mfu(run.tokens_per_iter, dt, run.peak)
        run.running_mfu = mfu if run.running_mfu < 0 else 0.9 * run.running_mfu + 0.1 * mfu
        mfu_text = f", mfu {run.running_mfu * 100:.1f}%"
    print0(f"iter {it}: loss {task + spatial:.4f} (task {task:.4f}, spatial {spatial:.4f}), "
           f"{dt * 1000:.0f} ms/iter, {run.tokens_per_iter / dt:,.0f} tok/s{mfu_text}"
           + (" (step skipped)" if step.skipped else ""))
    run.log.write(event="train", iter=it, loss=task + spatial, task=task, spatial=spatial, sites=step.stats["sites"],
                  lr=lr, grad_norm=step.grad_norm, skipped=step.skipped, loss_scale=step.loss_scale, dt=dt,
                  alpha_factor=factor, alpha_sites=[w * factor for w in run.cfg.site_alpha])
    run.wandb.log({"iter": it, "train/step_loss": task + spatial, "train/step_task": task,
                   "train/step_spatial": spatial, "lr": lr, "alpha_factor": factor}, step=it)


def check_ranks_agree(run: TrainRun) -> None:
    """Log every rank's weight digest at the end; refuse a DDP run whose ranks diverged."""
    digests = gather_objects(params_digest(run.raw_model), run.d)
    run.log.write(event="end", iter=run.iter_num, param_sha256=digests)
    if run.d.ddp and len(set(digests)) != 1:
        raise UserError("ranks ended with different weights")


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> None:
    cfg = load_config(TrainConfig, argv, default_file="train_shakespeare.yaml")
    given = command_line_keys(argv)
    cfg, loaded = adopt_source_shape(cfg, given)
    run_distributed(seed_for_positions(cfg, "seed" in given), partial(train, loaded=loaded))


def train(cfg: TrainConfig, d: Dist, loaded: tuple[dict, Path] | None = None) -> None:
    stop = StopFlag()  # before setup: a stop while the data and model load is honoured at the first check
    try:
        run = setup(cfg, d, loaded)
        try:
            if cfg.eval_only:
                set_alpha(run, run.iter_num)
                evaluate_and_log(run, run.iter_num, stop)
                return
            if train_loop(run, stop):
                stop_and_save(run)
        finally:
            run.wandb.finish()
    finally:
        stop.restore()


def train_loop(run: TrainRun, stop: StopFlag) -> bool:
    """Train to max_iters with the evaluations and checkpoints on their schedule; True when a stop was
    requested (after a step, or during an evaluation, which is then abandoned)."""
    cfg = run.cfg
    last_improved = True
    t0 = time.time()
    while run.iter_num < cfg.max_iters:
        it = run.iter_num
        factor = set_alpha(run, it)
        if it % cfg.eval_interval == 0:
            last_improved = evaluate_and_log(run, it, stop)
            if last_improved is None:
                return True
        if run.ckpts.due(it, last_improved):
            save(run, it)

        lr = learning_rate_at(it, cfg)
        step = run.opt.step(it, lr, run.accum_steps, run.micro_step, run.checks, stop.requested)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        run.iter_num += 1
        if it % cfg.log_interval == 0:
            log_step(run, it, lr, step, dt, factor)
        if step.stop:
            return True

    set_alpha(run, run.iter_num)
    if evaluate_and_log(run, run.iter_num, stop) is None:
        return True
    if run.ckpts.due(run.iter_num):
        save(run, run.iter_num)
    check_ranks_agree(run)
    return False


def stop_and_save(run: TrainRun) -> None:
    """The checkpoint of the last completed step, then exit (status 0); init_from=resume continues bit-exactly."""
    cfg = run.cfg
    print0(f"stop requested: saving a checkpoint at iteration {run.iter_num} and exiting; continue with: "
           f"{resume_command(out_dir=cfg.out_dir, run_name=cfg.run_dir().name)}")
    save(run, run.iter_num)
    run.log.write(event="stopped", iter=run.iter_num)


if __name__ == "__main__":
    cli_main(main)
