"""Malformed checkpoint files, foreign and our own: each refused with one `error:` line that says what is
wrong with the file (exit 2), nothing read out of bounds, no advice to load a file with code execution.

The malformed files are made here from the small research-format fixture (copied, its pickle edited op by
op, re-zipped) or from a tiny checkpoint of our own."""
import io
import os
import pickletools
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import import_research
import sample
from topolm.checkpoint import make_payload, save_checkpoint
from topolm.config import cli_main
from conftest import REPO
from model import GPT, GPTConfig

FIXTURE = REPO / "tests" / "fixtures" / "research-ckpt-small"
CKPT = FIXTURE / "ckpt-preresid.pt"
POSITIONS = FIXTURE / "positions-preresid"


# ----------------------------------------------------------------------------- running a command in process

def refusal(capsys, monkeypatch, main, argv: list[str]) -> str:
    """Run a command's `main` under `cli_main` as its command line would; return its one `error:` line (exit 2)."""
    monkeypatch.setattr(sys, "argv", ["command", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main(main)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def reason(line: str, path: Path) -> str:
    """What the error line says after naming `path` (the test's folder name may hold any word)."""
    assert str(path) in line, line
    return line.split(str(path), 1)[1]


def import_refusal(capsys, monkeypatch, tmp_path, ckpt: Path, positions: Path = POSITIONS) -> str:
    out = tmp_path / "imported.pt"
    line = refusal(capsys, monkeypatch, import_research.main, [f"ckpt={ckpt}", f"positions={positions}", f"out={out}"])
    assert not out.exists()
    return line


def sample_refusal(capsys, monkeypatch, ckpt: Path) -> str:
    return refusal(capsys, monkeypatch, sample.main, [f"ckpt={ckpt}", "max_new_tokens=1", "num_samples=1"])


# ----------------------------------------------------------------------------- making malformed files

def _encode(name: str, arg) -> bytes:
    """One pickle opcode with its argument, in the widest form of its kind (so any value fits)."""
    if name in ("BINUNICODE", "SHORT_BINUNICODE"):
        data = arg.encode()
        return b"X" + struct.pack("<I", len(data)) + data
    if name in ("BINBYTES", "SHORT_BINBYTES"):
        return b"B" + struct.pack("<I", len(arg)) + arg
    if name in ("BININT1", "BININT2", "BININT"):
        return b"J" + struct.pack("<i", arg)
    if name == "GLOBAL":
        return b"c" + arg.replace(" ", "\n").encode() + b"\n"
    raise ValueError(f"no encoder for {name}")


def rewrite_pickle(data: bytes, edit) -> bytes:
    """`data` with ops replaced: `edit(i, name, arg, ops)` returns a new argument for op i, or None to keep it.

    Frames (protocol 4) are dropped: they are optional and their lengths would be stale."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        new = edit(i, op.name, arg, ops)
        out += data[pos:end] if new is None else _encode(op.name, new)
    return bytes(out)


def rezip(src: Path, dst: Path, edit) -> Path:
    """A copy of the torch.save zip `src` whose data.pkl is rewritten by `edit` (see rewrite_pickle)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, rewrite_pickle(data, edit) if info.filename.endswith("/data.pkl") else data)
    return dst


def first_size_grown(i, name, arg, ops):
    """The first dimension of the first tensor one larger: in torch's pickle a tensor's persistent storage
    id is followed by its storage offset and then its sizes."""
    if name in ("BININT1", "BININT2", "BININT") and i >= 2 and ops[i - 2][0].name == "BINPERSID" \
            and not getattr(first_size_grown, "done", False):
        first_size_grown.done = True
        return arg + 1
    return None


def grow_first_size(src: Path, dst: Path) -> Path:
    first_size_grown.done = False
    return rezip(src, dst, first_size_grown)


def own_checkpoint(path: Path) -> Path:
    """A tiny checkpoint of our own format (vocabulary 64)."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embed=36, block_size=16, vocab_size=64, radius=2, neighborhoods_per_batch=3)
    save_checkpoint(make_payload(GPT(cfg), kind="pretrain", config={}, iter_num=0, tokenizer=None,
                                 layout_source="random"), path)
    return path


# ----------------------------------------------------------------------------- tensors outside their storage

def test_a_research_tensor_larger_than_its_storage_is_refused_without_reading_past_it(capsys, monkeypatch, tmp_path):
    bad = grow_first_size(CKPT, tmp_path / "grown.pt")
    line = import_refusal(capsys, monkeypatch, tmp_path, bad)
    assert "larger than its storage" in reason(line, bad), line


def test_our_own_tensor_larger_than_its_storage_is_refused_with_the_reason(capsys, monkeypatch, tmp_path):
    bad = grow_first_size(own_checkpoint(tmp_path / "own.pt"), tmp_path / "grown.pt")
    line = sample_refusal(capsys, monkeypatch, bad)
    assert "larger than its storage" in reason(line, bad), line


# ----------------------------------------------------------------------------- wrapper prefixes

@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod.", "_orig_mod.module._orig_mod.", "module.module."])
def test_any_nesting_of_the_ddp_and_compile_prefixes_imports(capsys, monkeypatch, tmp_path, prefix):
    import numpy as np
    from topolm.checkpoint import load_model

    def rename(i, name, arg, ops):  # the fixture's keys all start with _orig_mod.
        if name in ("BINUNICODE", "SHORT_BINUNICODE") and arg.startswith("_orig_mod."):
            return prefix + arg[len("_orig_mod."):]
        return None

    wrapped, out = rezip(CKPT, tmp_path / "wrapped.pt", rename), tmp_path / "imported.pt"
    monkeypatch.setattr(sys, "argv", ["import_research.py", f"ckpt={wrapped}", f"positions={POSITIONS}", f"out={out}"])
    cli_main(import_research.main)
    model, _, _ = load_model(out)
    ids = torch.from_numpy(np.load(FIXTURE / "input_ids-preresid.npy"))
    with torch.no_grad():
        logits = model.lm_head(model.encode(ids, spatial=False)[0])[:, -4:]
    expected = torch.from_numpy(np.load(FIXTURE / "logits-preresid.npy"))
    assert (logits - expected).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- globals that are refused

class NamesAFunction:
    """Pickles as a call of os.getcwd: a global that no checkpoint needs (harmless if it ever ran)."""

    def __reduce__(self):
        return (os.getcwd, ())


def legacy_bytes_naming_a_function() -> bytes:
    buf = io.BytesIO()
    torch.save(NamesAFunction(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def refused_global_is_named(line: str, path: Path) -> None:
    assert "getcwd" in reason(line, path), line
    assert "weights_only" not in line and "trusted" not in line, line  # never the advice to run the file's code


def test_a_refused_global_inside_research_positions_is_named_without_torchs_advice(capsys, monkeypatch, tmp_path):
    positions = tmp_path / "positions"
    shutil.copytree(POSITIONS, positions)
    pkl = positions / "layer.1.mlp.pkl"
    payload = legacy_bytes_naming_a_function()
    pkl.write_bytes(rewrite_pickle(pkl.read_bytes(), lambda i, name, arg, ops:  # the first tensor's bytes
                                   payload if name in ("BINBYTES", "SHORT_BINBYTES") and i < 40 else None))
    refused_global_is_named(import_refusal(capsys, monkeypatch, tmp_path, CKPT, positions), pkl)


def test_a_refused_global_in_a_research_checkpoint_is_named(capsys, monkeypatch, tmp_path):
    bad = rezip(CKPT, tmp_path / "global.pt",
                lambda i, name, arg, ops: "os getcwd" if name == "GLOBAL" and arg == "collections OrderedDict" else None)
    refused_global_is_named(import_refusal(capsys, monkeypatch, tmp_path, bad), bad)


def test_a_refused_global_in_our_own_format_is_named_without_torchs_advice(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "global.pt"
    torch.save({"format": "topolm-ckpt-v2", "model": NamesAFunction()}, bad)
    line = sample_refusal(capsys, monkeypatch, bad)
    refused_global_is_named(line, bad)
    assert "import_research" not in line  # no research class in it: not a research checkpoint


def test_a_research_checkpoint_given_as_ours_gets_the_import_command(capsys, monkeypatch):
    line = sample_refusal(capsys, monkeypatch, CKPT)
    assert str(CKPT) in line and "omegaconf" in line and "python import_research.py ckpt=" in line, line
    assert "weights_only" not in line and "trusted" not in line, line


# ----------------------------------------------------------------------------- truncated files

def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


def says_truncated(line: str, path: Path) -> None:
    assert "truncated" in reason(line, path), line
    assert "1.6" not in line, line  # a cut-off file is no old torch's file


def test_a_truncated_research_checkpoint_is_called_truncated(capsys, monkeypatch, tmp_path):
    for keep in (0.5, 0.999):
        bad = truncated_copy(CKPT, tmp_path / f"cut{keep}.pt", keep)
        says_truncated(import_refusal(capsys, monkeypatch, tmp_path, bad), bad)


def test_a_truncated_research_positions_pickle_is_called_truncated(capsys, monkeypatch, tmp_path):
    positions = tmp_path / "positions"
    shutil.copytree(POSITIONS, positions)
    truncated_copy(POSITIONS / "layer.0.mlp.pkl", positions / "layer.0.mlp.pkl")
    says_truncated(import_refusal(capsys, monkeypatch, tmp_path, CKPT, positions), positions / "layer.0.mlp.pkl")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_checkpoint_of_ours_is_called_truncated(capsys, monkeypatch, tmp_path, legacy):
    own = own_checkpoint(tmp_path / "own.pt")
    if legacy:  # torch's format before 1.6, which torch.load still reads
        torch.save(torch.load(own, weights_only=True), own, _use_new_zipfile_serialization=False)
    bad = truncated_copy(own, tmp_path / "cut.pt")
    says_truncated(sample_refusal(capsys, monkeypatch, bad), bad)


def test_a_research_checkpoint_in_torchs_legacy_format_is_named_so(capsys, monkeypatch, tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {}}, legacy, _use_new_zipfile_serialization=False)
    line = import_refusal(capsys, monkeypatch, tmp_path, legacy)
    assert "legacy format" in reason(line, legacy) and "torch < 1.6" in line, line


# ----------------------------------------------------------------------------- files that are no checkpoint

def not_a_checkpoint(kind: str, path: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":  # 'i' is pickle opcode 105, which torch's loader reports as a bare number
        path.write_text("in the beginning was the word\n" * 20)
    elif kind == "npy":
        import numpy as np

        np.save(path.with_suffix(".npy"), np.arange(10))
        path.with_suffix(".npy").rename(path)
    else:  # a zip file that torch.save did not write
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "no checkpoint in here")
    return path


KINDS = ["empty", "text", "npy", "zip"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_no_checkpoint_is_named_so_by_our_loader(capsys, monkeypatch, tmp_path, kind):
    bad = not_a_checkpoint(kind, tmp_path / "file.pt")
    said = reason(sample_refusal(capsys, monkeypatch, bad), bad)
    assert "not a checkpoint" in said or "empty" in said, said
    assert "105" not in said and "truncated" not in said, said


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_no_checkpoint_is_named_so_by_the_importer(capsys, monkeypatch, tmp_path, kind):
    bad = not_a_checkpoint(kind, tmp_path / "file.pt")
    said = reason(import_refusal(capsys, monkeypatch, tmp_path, bad), bad)
    assert "not a checkpoint" in said or "empty" in said, said
    assert "1.6" not in said and "truncated" not in said, said


@pytest.mark.parametrize("kind", ["empty", "text"])
def test_a_positions_file_that_is_no_pickle_is_named_so(capsys, monkeypatch, tmp_path, kind):
    positions = tmp_path / "positions"
    shutil.copytree(POSITIONS, positions)
    not_a_checkpoint(kind, positions / "layer.1.attn.pkl")
    said = reason(import_refusal(capsys, monkeypatch, tmp_path, CKPT, positions), positions / "layer.1.attn.pkl")
    assert "not a pickle" in said or "empty" in said, said


# ----------------------------------------------------------------------------- readable files with malformed contents

@pytest.fixture(scope="module")
def research_parts():
    from topolm.research import read_research_checkpoint

    research = read_research_checkpoint(CKPT)
    return {k: v.clone() for k, v in research["model"].items()}, research["model_args"]


RESEARCH_CONTENTS = {  # name: (edit of (model, model_args, extra top-level keys), what the line must say)
    "model_args a list": (lambda m, a: (m, [1], {}), "model_args"),
    "model a tensor": (lambda m, a: (torch.zeros(3), a, {}), "'model'"),
    "n_layer text": (lambda m, a: (m, {**a, "n_layer": "two"}, {}), "n_layer"),
    "n_embed text": (lambda m, a: (m, {**a, "n_embed": "36x"}, {}), "n_embed"),
    "n_layer huge": (lambda m, a: (m, {**a, "n_layer": 10**9}, {}), "n_layer"),
    "n_layer zero": (lambda m, a: (m, {**a, "n_layer": 0}, {}), "n_layer"),
    "n_embed huge": (lambda m, a: (m, {**a, "n_embed": 10**10}, {}), "n_embed"),
    "a weight not a tensor": (lambda m, a: ({**m, "_orig_mod.lm_head.weight": 3}, a, {}), "lm_head.weight"),
    "a weight name not text": (lambda m, a: ({**m, 5: torch.zeros(1)}, a, {}), "5"),
    "iter_num text": (lambda m, a: (m, a, {"iter_num": "x"}), "iter_num"),
    "best_val_loss a vector": (lambda m, a: (m, a, {"best_val_loss": torch.zeros(3)}), "best_val_loss"),
}


@pytest.mark.parametrize("case", list(RESEARCH_CONTENTS))
def test_a_research_checkpoint_with_malformed_contents_is_refused_with_what_is_wrong(
        capsys, monkeypatch, tmp_path, research_parts, case):
    edit, fragment = RESEARCH_CONTENTS[case]
    model, args, extra = edit(*research_parts)
    bad = tmp_path / "research.pt"
    torch.save({"model": model, "model_args": args, **extra}, bad)
    assert fragment in reason(import_refusal(capsys, monkeypatch, tmp_path, bad), bad)


def own_payload():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embed=36, block_size=16, vocab_size=64, radius=2, neighborhoods_per_batch=3)
    return make_payload(GPT(cfg), kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="random")


def _wrong_shape(p):
    return {**p, "model": {**p["model"], "lm_head.weight": torch.zeros(3, 3)}}


OWN_CONTENTS = {  # name: (edit of a valid payload, what the line must say)
    "no model": (lambda p: {k: v for k, v in p.items() if k != "model"}, "'model'"),
    "no model_config": (lambda p: {k: v for k, v in p.items() if k != "model_config"}, "model_config"),
    "model a list": (lambda p: {**p, "model": [1]}, "'model'"),
    "model_config impossible": (lambda p: {**p, "model_config": {**p["model_config"], "n_embed": 49}}, "n_embed=49"),
    "model_config unknown key": (lambda p: {**p, "model_config": {**p["model_config"], "zzz": 1}}, "zzz"),
    "a weight of the wrong shape": (_wrong_shape, "lm_head.weight"),
    "a weight missing": (lambda p: {**p, "model": {k: v for k, v in p["model"].items() if k != "lm_head.weight"}},
                         "lm_head.weight"),
    "no layout": (lambda p: {k: v for k, v in p.items() if k != "layout"}, "layout"),
}


@pytest.mark.parametrize("case", list(OWN_CONTENTS))
def test_a_checkpoint_of_ours_with_malformed_contents_is_refused_with_what_is_wrong(capsys, monkeypatch, tmp_path, case):
    edit, fragment = OWN_CONTENTS[case]
    bad = tmp_path / "own.pt"
    torch.save(edit(own_payload()), bad)
    assert fragment in reason(sample_refusal(capsys, monkeypatch, bad), bad)
