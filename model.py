"""GPT-2 whose hidden units sit on a 2-D cortical sheet (TopoLM), in one file.

The network is nanoGPT's GPT-2: token + learned position embeddings, pre-LayerNorm blocks,
causal scaled-dot-product attention, a 4x GELU MLP (exact or tanh GELU), weight tying and the scaled init of the
residual projections. What TopoLM adds:
- Two spatial sites per block, `layer.{i}.attn` and `layer.{i}.mlp`. A site's activation is the
  sublayer's output before it is added into the residual stream (`with_resid=False`, the
  paper's model) or the residual stream just after the addition (`with_resid=True`). Each site
  passes through an `nn.Identity` tap, so forward hooks on `model.sites()` expose activations
  (see `site_activations`).
- `self.sheet` (positions.CorticalSheet) owns the frozen unit positions as a buffer, so they
  travel in the checkpoint, and computes the spatial loss.
- Only the columns of the sampled neighborhoods are gathered during the forward pass, and all
  sites' neighborhoods go through one batched loss. Each site has its own weight (alpha, or per
  site kind / per site); at a site of weight 0 none of this runs, and with every weight 0 nothing does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

from topolm.config import Checked, require
from positions import CorticalSheet, check_radius, sheet_shape, site_names


@dataclass
class SheetShape(Checked):
    """The keys that fix a model's shape and its sheets (shared by GPTConfig and init_pos.py)."""
    n_layer: int = 12
    """Transformer blocks (two spatial sites each)."""
    n_head: int = 16
    """Attention heads; must divide n_embed."""
    n_embed: int = 784
    """Hidden units per site; they sit on a rows x columns grid of n_embed cells (sheet_rows)."""
    sheet_rows: int = 0
    """Rows of every site's sheet, which then has n_embed / sheet_rows columns; 0: the most square rows x
    columns of n_embed (28 x 28 for 784, 24 x 32 for GPT-2's 768, 6 x 8 for 48)."""
    vocab_size: int = 50304
    """Vocabulary size; GPT-2's 50257 padded to a multiple of 64."""
    with_resid: bool = False
    """Site activation: False = sublayer output before the residual add (the paper); True = residual stream after it."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("n_layer", "n_head", "n_embed", "vocab_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        sheet_shape(self.n_embed, self.sheet_rows)
        self.check_heads()

    def check_heads(self) -> None:
        require(self.n_embed % self.n_head == 0, f"n_embed={self.n_embed} is not divisible by n_head={self.n_head}")

    @property
    def n_sites(self) -> int:
        return 2 * self.n_layer

    @property
    def sheet(self) -> tuple[int, int]:
        """(rows, cols) of every site's sheet."""
        return sheet_shape(self.n_embed, self.sheet_rows)


@dataclass
class GPTConfig(SheetShape):
    """The model: GPT-2's shape plus the spatial loss (Rathi et al. 2025, TopoLM: nanoGPT's GPT-2 with TDANN's spatial loss)."""
    block_size: int = 1024
    """Context length in tokens."""
    dropout: float = 0.0
    """Dropout probability, in [0, 1) (0.0 for pretraining)."""
    radius: int = 5
    """Neighborhood radius: a neighborhood is a (2r-1) x (2r-1) block of the grid."""
    neighborhoods_per_batch: int = 5
    """Neighborhoods sampled per site on every forward pass."""
    alpha: float = 2.5
    """Weight of each site's spatial loss; 0 trains the non-topographic control. alpha_attn, alpha_mlp or
    alpha_sites give sites other weights."""
    alpha_attn: float | None = None
    """Weight of the attention sites (layer.{i}.attn) instead of alpha; null: alpha."""
    alpha_mlp: float | None = None
    """Weight of the MLP sites (layer.{i}.mlp) instead of alpha; null: alpha (alpha_mlp=0: attention sites only)."""
    alpha_sites: list[float] = field(default_factory=list)
    """One weight per site in site order (layer.0.attn, layer.0.mlp, layer.1.attn, ...: 2 x n_layer values,
    e.g. alpha_sites=[2.5,0,1,0]) instead of alpha; empty: alpha, alpha_attn and alpha_mlp. Not together with
    alpha_attn or alpha_mlp. A site of weight 0 costs nothing: no neighborhood of it is sampled."""
    accum: Literal["mean", "max"] = "mean"
    """How a site combines its neighborhoods' losses: 'mean' or 'max'."""
    n_output_ids: int = 0
    """0: the output softmax runs over all vocab_size ids (GPT-2, the paper). n > 0: it runs over the n
    ids in the buffer `output_ids` only (e.g. the ids that occur in the training corpus); every other
    id gets logit -inf in every forward, so it has probability 0. The embedding keeps all vocab_size
    rows and GPT-2's ids. Such a model has no exact transformers.GPT2LMHeadModel equivalent."""
    activation: Literal["gelu", "gelu_new"] = "gelu"
    """The MLP's GELU: 'gelu' the exact erf form (nanoGPT, the paper), 'gelu_new' the tanh approximation
    (OpenAI's GPT-2 and Hugging Face's default); both export as transformers' activation_function."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("block_size", "neighborhoods_per_batch"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        rows, cols = self.sheet
        n_centres = check_radius(self.sheet, self.radius)
        require(self.neighborhoods_per_batch <= n_centres,
                f"neighborhoods_per_batch={self.neighborhoods_per_batch} exceeds the {n_centres} neighborhoods "
                f"of radius {self.radius} on a {rows}x{cols} grid")
        for key in ("alpha", "alpha_attn", "alpha_mlp"):
            value = getattr(self, key)
            require(value is None or (value >= 0 and math.isfinite(value)),
                    f"{key}={value} must be a finite number >= 0")
        if self.alpha_sites:
            require(self.alpha_attn is None and self.alpha_mlp is None,
                    "alpha_sites gives every site's weight: leave alpha_attn and alpha_mlp out (null)")
            require(len(self.alpha_sites) == self.n_sites,
                    f"alpha_sites has {len(self.alpha_sites)} values; the model's {self.n_layer} layers have "
                    f"{self.n_sites} sites (2 x n_layer, in the order layer.0.attn, layer.0.mlp, ...)")
            require(all(v >= 0 and math.isfinite(v) for v in self.alpha_sites),
                    f"alpha_sites={list(self.alpha_sites)}: every weight must be a finite number >= 0")
        require(self.accum in ("mean", "max"), f"accum must be 'mean' or 'max'; got '{self.accum}'")
        require(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        require(self.activation in ("gelu", "gelu_new"),
                f"activation must be 'gelu' or 'gelu_new'; got '{self.activation}'")
        require(0 <= self.n_output_ids <= self.vocab_size,
                f"n_output_ids={self.n_output_ids} must be in [0, vocab_size={self.vocab_size}]")


    @property
    def site_alpha(self) -> list[float]:
        """The spatial loss's weight of each site, in site order (n_sites values): alpha_sites, else
        alpha_attn / alpha_mlp per kind, else alpha."""
        if self.alpha_sites:
            return [float(v) for v in self.alpha_sites]
        attn = self.alpha if self.alpha_attn is None else self.alpha_attn
        mlp = self.alpha if self.alpha_mlp is None else self.alpha_mlp
        return [float(w) for _ in range(self.n_layer) for w in (attn, mlp)]

    @property
    def spatial_sites(self) -> list[int]:
        """Indices (site order) of the sites whose weight is > 0: the only ones whose spatial loss is computed."""
        return [i for i, w in enumerate(self.site_alpha) if w > 0]

    @property
    def alpha_uniform(self) -> float | None:
        """The one weight every site has, None when sites differ."""
        weights = set(self.site_alpha)
        return weights.pop() if len(weights) == 1 else None

    def scaled_alpha(self, scale: float) -> dict:
        """The alpha keys with every site's weight multiplied by `scale` (finetune.py's alpha_scale)."""
        return {"alpha": self.alpha * scale,
                "alpha_attn": None if self.alpha_attn is None else self.alpha_attn * scale,
                "alpha_mlp": None if self.alpha_mlp is None else self.alpha_mlp * scale,
                "alpha_sites": [v * scale for v in self.alpha_sites]}

    def alpha_label(self) -> str:
        """The site weights in a run folder's name: a2.5 (every site), a2.5-0 (attention, MLP sites), or
        a-<8 hex digits of the list's SHA-256> for any other per-site list."""
        uniform = self.alpha_uniform
        if uniform is not None:
            return f"a{uniform:g}"
        attn, mlp = set(self.site_alpha[0::2]), set(self.site_alpha[1::2])
        if len(attn) == 1 and len(mlp) == 1:
            return f"a{attn.pop():g}-{mlp.pop():g}"
        import hashlib
        return "a-" + hashlib.sha256(repr(self.site_alpha).encode()).hexdigest()[:8]


ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embed", "bias", "n_output_ids", "activation")


class Losses(NamedTuple):
    total: torch.Tensor
    task: torch.Tensor
    spatial: torch.Tensor  # sum over sites of alpha_site * SL_site (times the schedule's factor in training)
    per_site: torch.Tensor  # (n_sites,) SL of each site, before alpha; 0 at a site of weight 0 (not computed)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embed, 3 * config.n_embed, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embed, config.n_embed, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embed, self.dropout = config.n_head, config.n_embed, config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embed
        q, k, v = self.c_attn(x).split(self.n_embed, dim=2)  # each (B, T, C)
        # (B, nh, T, hs): heads become a batch dimension; hs = C / nh (49 at the paper's width)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embed, 4 * config.n_embed, bias=config.bias)
        # gelu_new is torch's tanh approximation, the same formula as transformers' NewGELUActivation
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_new" else "none")
        self.c_proj = nn.Linear(4 * config.n_embed, config.n_embed, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embed, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embed, bias=config.bias)
        self.mlp = MLP(config)
        # Taps: identity modules whose outputs are the site activations (hook points).
        self.attn_site = nn.Identity()
        self.mlp_site = nn.Identity()
        self.with_resid = config.with_resid

    def forward(self, x):
        """The block's output and its two site activations (attn, mlp)."""
        if self.with_resid:
            x = a = self.attn_site(x + self.attn(self.ln_1(x)))
            x = m = self.mlp_site(x + self.mlp(self.ln_2(x)))
        else:
            a = self.attn_site(self.attn(self.ln_1(x)))
            x = x + a
            m = self.mlp_site(self.mlp(self.ln_2(x)))
            x = x + m
        return x, (a, m)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, positions=None, output_ids=None):
        """positions: (n_sites, n_embed, 2) grid coordinates; None leaves the identity layout,
        to be replaced by the checkpoint's or by `set_positions`.
        output_ids: the config.n_output_ids ids of a restricted output softmax (strictly increasing,
        < vocab_size); None leaves 0..n-1, to be replaced by the checkpoint's `output_ids`."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embed),
            wpe=nn.Embedding(config.block_size, config.n_embed),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embed, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embed, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.sheet = CorticalSheet(config.n_sites, config.n_embed, config.radius, positions, rows=config.sheet_rows)
        self.site_names = site_names(config.n_layer)
        # The sites whose loss is computed; every one (None) keeps the draw of all-sites models as it was
        self.spatial_sites = config.spatial_sites
        self._sampled = None if len(self.spatial_sites) == config.n_sites else self.spatial_sites
        self.register_buffer("site_alpha", torch.tensor(config.site_alpha, dtype=torch.float32), persistent=False)
        # The schedule's factor of the current step (train.py's alpha_schedule), a buffer so that a compiled
        # model reads its new value every step without recompiling
        self.register_buffer("alpha_factor", torch.ones((), dtype=torch.float32), persistent=False)
        if config.n_output_ids:
            self.register_buffer("output_ids", torch.arange(config.n_output_ids))
            if output_ids is not None:
                self.set_output_ids(output_ids)
        elif output_ids is not None:
            raise ValueError("output_ids given but config.n_output_ids is 0")

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def set_output_ids(self, ids) -> None:
        """Make `ids` ((n_output_ids,) strictly increasing ints in [0, vocab_size)) the output vocabulary."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.output_ids.device).flatten()
        n, V = self.config.n_output_ids, self.config.vocab_size
        if ids.numel() != n or (n > 1 and not bool((ids[1:] > ids[:-1]).all())) or int(ids.min()) < 0 \
                or int(ids.max()) >= V:
            raise ValueError(f"output_ids must be {n} strictly increasing ids in [0, {V})")
        self.output_ids.copy_(ids)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) of final hidden states (..., n_embed); -inf outside `output_ids`
        when the output vocabulary is restricted."""
        if not self.config.n_output_ids:
            return self.lm_head(x)
        sub = F.linear(x, self.lm_head.weight[self.output_ids])
        full = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy(-1, self.output_ids, sub)

    def task_loss(self, x: torch.Tensor, targets: torch.Tensor, return_logits: bool = True):
        """(mean next-token cross-entropy over targets != -1, logits (B, T, vocab_size) or None).

        With a restricted output vocabulary only the n_output_ids columns are computed (the
        -inf columns add exactly 0 to the softmax's normaliser); a target outside `output_ids` has
        probability 0 and makes the loss inf. return_logits=False skips building the full logits."""
        if not self.config.n_output_ids:
            logits = self.lm_head(x)
            task = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return task, (logits if return_logits else None)
        ids = self.output_ids
        sub = F.linear(x, self.lm_head.weight[ids])
        t = targets.reshape(-1)
        col = torch.searchsorted(ids, t.clamp(min=0)).clamp(max=ids.numel() - 1)
        outside = (ids[col] != t) & (t != -1)
        col = torch.where((t == -1) | outside, -1, col)
        per_token = F.cross_entropy(sub.view(-1, ids.numel()), col, ignore_index=-1, reduction="none")
        per_token = per_token.masked_fill(outside, float("inf"))
        task = per_token.sum() / (t != -1).sum()
        logits = None
        if return_logits:
            logits = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf")).index_copy(-1, ids, sub)
        return task, logits

    def get_num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def sites(self) -> dict[str, nn.Module]:
        """Hook points: site name -> the identity module whose output is that site's activation."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            out[f"layer.{i}.attn"] = block.attn_site
            out[f"layer.{i}.mlp"] = block.mlp_site
        return out

    @property
    def spatial_on(self) -> bool:
        """Whether any site's weight is > 0."""
        return bool(self.spatial_sites)

    @torch.no_grad()
    def set_alpha_factor(self, factor: float) -> None:
        """Multiply every site's weight by `factor` from now on (train.py's alpha schedule; 1 by default)."""
        self.alpha_factor.fill_(factor)

    def sample_units(self, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Units of this step's random neighborhoods (len(spatial_sites), k * members), one row per site of
        weight > 0 in site order; None when every weight is 0.

        Callers that compile the model draw these outside it (a seeded generator breaks the graph)."""
        if not self.spatial_on:
            return None
        return self.sheet.sample_units(self.config.neighborhoods_per_batch, generator, self._sampled)

    def encode(self, idx, generator: torch.Generator | None = None, spatial: bool = True,
               units: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        """Final hidden states (B, T, C) and per-site spatial losses (n_sites,) or None.

        lengths: (B,) real tokens per right-padded sequence; positions from `lengths` on are
        padding and are left out of the spatial loss. Attention is causal, so a real token
        never sees the padding after it and its hidden state is the same as without padding.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        k = self.config.neighborhoods_per_batch
        if not (spatial and self.spatial_on):
            units = None
        elif units is None:
            units = self.sample_units(generator)
        row_mask = None
        if units is not None and lengths is not None:
            row_mask = (pos.unsqueeze(0) < lengths.unsqueeze(1)).reshape(B * T, 1).float()
        grams, row = [], {s: j for j, s in enumerate(self.spatial_sites)}
        for i, block in enumerate(self.transformer.h):
            x, site_acts = block(x)
            if units is not None:
                for s, act in zip((2 * i, 2 * i + 1), site_acts):
                    if s in row:
                        grams.append(self.sheet.site_gram(act, units[row[s]], k, row_mask))
        x = self.transformer.ln_f(x)
        per_site = self.sheet.loss(torch.stack(grams), self.config.accum) if units is not None else None
        if per_site is not None and self._sampled is not None:  # the sites of weight 0 get 0, not computed
            index = torch.tensor(self._sampled, device=per_site.device)
            per_site = per_site.new_zeros(self.config.n_sites).index_copy(0, index, per_site)
        return x, per_site

    def forward(self, idx, targets=None, generator: torch.Generator | None = None, units: torch.Tensor | None = None,
                return_logits: bool = True):
        """Logits, and with targets a `Losses` (total = task + alpha_factor x sum over sites of alpha_site x SL).

        The neighborhoods are `units` if given, else drawn from `generator` (see `sample_units`).
        Without targets the logits are the last position's (B, 1, vocab_size); with targets all
        positions' (B, T, vocab_size), or None if return_logits=False (training needs the loss only,
        and a restricted output vocabulary then never builds the full-width logits)."""
        x, per_site = self.encode(idx, generator, spatial=targets is not None, units=units)
        if targets is None:
            return self.output_logits(x[:, [-1], :]), None  # generation needs the last position only
        task, logits = self.task_loss(x, targets, return_logits)
        return logits, self.combine_losses(task, per_site)

    def combine_losses(self, task: torch.Tensor, per_site: torch.Tensor | None) -> Losses:
        if per_site is None:
            zero = task.new_zeros(())
            return Losses(task, task, zero, task.new_zeros(self.config.n_sites))
        uniform = self.config.alpha_uniform
        spatial = uniform * per_site.sum() if uniform is not None else (self.site_alpha * per_site).sum()
        spatial = spatial * self.alpha_factor
        return Losses(task + spatial, task, spatial, per_site)

    @torch.no_grad()
    def site_activations(self, idx) -> dict[str, torch.Tensor]:
        """Activations (B, T, n_embed) of every site for a batch of token ids, via forward hooks."""
        acts, handles = {}, []
        for name, module in self.sites().items():
            handles.append(module.register_forward_hook(
                lambda _m, _inp, out, name=name: acts.__setitem__(name, out.detach())))
        try:
            self.encode(idx, spatial=False)
        finally:
            for h in handles:
                h.remove()
        return acts

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilization (PaLM appendix B), for `tokens_per_iter` tokens in `dt` seconds."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embed // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


class SequenceClassifier(nn.Module):
    """A GPT with a new linear head on the final hidden state of each sequence's last real token.

    Batches are right-padded and `lengths` says where each sequence ends: the head reads position
    lengths - 1 (never a pad), and padding rows are left out of the spatial loss. n_outputs is the
    number of classes, or 1 for a regression task.
    """

    def __init__(self, gpt: GPT, n_outputs: int, dropout: float):
        super().__init__()
        self.gpt = gpt
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embed, n_outputs)
        torch.nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths, units: torch.Tensor | None = None, spatial: bool = True):
        """Outputs (B, n_outputs) and per-site spatial losses (n_sites,) or None."""
        hidden, per_site = self.gpt.encode(idx, spatial=spatial, units=units, lengths=lengths)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(self.dropout(last)), per_site


def configure_adamw(module: nn.Module, weight_decay: float, learning_rate: float, betas, device_type: str):
    """AdamW with weight decay on matrices (and embeddings) only, not on gains and biases.

    The fused implementation on CUDA and CPU (the same update as the default; on CPU about 4x faster
    than the multi-tensor one, which matters when the optimizer step is a large share of a small
    model's step: 8.3M parameters, mostly the embedding, for the demo)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
