"""train.py init_from=<model>: a new run from the weights of a checkpoint, an imported research checkpoint,
an export or any Hugging Face GPT-2 folder whose config fits model.py (the one loader,
topolm.checkpoint.load_source), at the source's logits, with its layout and a fresh optimizer; and
what is refused, in one line, before anything is written."""
import json
import shutil

import numpy as np
import pytest
import torch

import export_hf
import import_research
import train
from conftest import random_hf_gpt2, PYTHON, REPO, overrides, read_log, run_in_process, run_main, one_error_line, write_pattern_data
from topolm.checkpoint import load_checkpoint, load_model, save_checkpoint

FIXTURE_RESEARCH = REPO / "tests" / "fixtures" / "research-ckpt-small"
# the session model's shape, which a run started from it takes; a run's own keys stay TINY's
SHAPE_KEYS = ("n_layer", "n_head", "n_embed", "vocab_size", "block_size")


def run_args(data, out, init_from, **kw) -> list[str]:
    """train.py's arguments for a short run from `init_from` (its shape keys left to the source)."""
    base = {**dict(dataset=str(data), out_dir=str(out), run_name="run", init_from=str(init_from), max_iters=4,
                   eval_interval=4, save_interval=4, eval_iters=2, alpha=5.0, learning_rate=1e-3, min_lr=1e-4,
                   warmup_iters=0), **kw}
    return [a for a in overrides(**base) if a.split("=", 1)[0] not in SHAPE_KEYS]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A randomly initialised transformers GPT2LMHeadModel (GPT-2's own gelu_new, GPT-2's 50257 ids, a 6x6
    sheet's width) with random biases and larger MLP inputs, saved with save_pretrained: a foreign GPT-2 folder."""
    return random_hf_gpt2(tmp_path_factory.mktemp("hf") / "gpt2-tiny", 36)


@pytest.fixture(scope="module")
def sources(gpt2_run, hf_gpt2, tmp_path_factory):
    """(model, data) of each kind of source: the session's checkpoint, an imported research checkpoint
    (vocabulary 64, on a pattern corpus), its export, and the foreign GPT-2 folder."""
    root = tmp_path_factory.mktemp("sources")
    research = root / "research.pt"
    import_research.main([f"ckpt={FIXTURE_RESEARCH / 'ckpt-preresid.pt'}",
                          f"positions={FIXTURE_RESEARCH / 'positions-preresid'}", f"out={research}"])
    export = root / "export"
    run_in_process([PYTHON, "export_hf.py", f"ckpt={gpt2_run.ckpt}", f"out={export}"])
    pattern = write_pattern_data(root / "pattern", vocab=64, n_train=4000, n_val=1000)
    return {"checkpoint": (gpt2_run.ckpt, gpt2_run.data), "research": (research, pattern),
            "export": (export, gpt2_run.data), "hf": (hf_gpt2[0], gpt2_run.data)}


def logits(model, vocab: int, block: int) -> torch.Tensor:
    ids = torch.randint(0, min(vocab, 64), (2, min(block, 16)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, ids)[0]


def test_a_foreign_gpt2_folder_loads_at_transformers_logits(hf_gpt2):
    folder, hf = hf_gpt2
    gpt, ckpt, path = load_model(folder)
    assert ckpt["model_config"]["activation"] == "gelu_new" and ckpt["model_config"]["bias"] is True
    assert ckpt["layout"]["permutation"] and ckpt["tokenizer"] == {"name": "gpt2", "n_vocab": 50257}
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (logits_of(gpt, ids) - theirs).abs().max().item() < 1e-5


def logits_of(gpt, ids):
    with torch.no_grad():
        return gpt(ids, ids)[0]


def test_an_export_keeps_the_activation_and_loads_back(hf_gpt2, gpt2_run, tmp_path):
    from transformers import GPT2LMHeadModel
    from topolm.hf import export_hf as write_export

    gpt, ckpt, _ = load_model(hf_gpt2[0])
    write_export(gpt, ckpt, tmp_path / "again", "test")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["activation_function"] == "gelu_new"
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(str(tmp_path / "again")).eval()(ids).logits
    assert (logits_of(gpt, ids) - theirs).abs().max().item() < 1e-5
    # an export of this project's checkpoint (bias=False, exact gelu) comes back as the same model
    ours, ours_ckpt, _ = load_model(gpt2_run.ckpt)
    write_export(ours, ours_ckpt, tmp_path / "ours", "test")
    back, back_ckpt, _ = load_model(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["activation_function"] == "gelu"
    assert back_ckpt["model_config"] == {**ours_ckpt["model_config"], "dropout": 0.0}
    assert torch.equal(back.sheet.unit_coords, ours.sheet.unit_coords)
    ids = ids % ours.config.vocab_size
    assert (logits_of(back, ids) - logits_of(ours, ids)).abs().max().item() < 1e-5


def test_a_checkpoint_without_activation_loads_with_the_exact_gelu(gpt2_run, tmp_path):
    ckpt = load_checkpoint(gpt2_run.ckpt)
    del ckpt["model_config"]["activation"]
    save_checkpoint(ckpt, tmp_path / "old.pt")
    gpt, loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded["model_config"]["activation"] == "gelu" and gpt.transformer.h[0].mlp.gelu.approximate == "none"


@pytest.mark.parametrize("kind", ["checkpoint", "research", "export", "hf"])
def test_init_from_starts_at_the_source_and_lowers_the_spatial_loss(sources, kind, tmp_path, monkeypatch):
    source, data = sources[kind]
    with monkeypatch.context() as m:  # the model as the run starts it, saved before any step
        m.setattr(train, "train_loop", lambda run, stop: train.save(run, 0))
        ran = run_in_process([PYTHON, "train.py", *run_args(data, tmp_path, source, run_name="zero")])
    assert "starting from the weights of" in ran.stdout
    src, _, _ = load_model(source)
    start, _, _ = load_model(tmp_path / "zero" / "ckpt-0000000.pt")
    c = src.config
    assert (logits(start, c.vocab_size, c.block_size) - logits(src, c.vocab_size, c.block_size)).abs().max() < 1e-5
    assert torch.equal(start.sheet.unit_coords, src.sheet.unit_coords) or kind == "hf"
    run_in_process([PYTHON, "train.py", *run_args(data, tmp_path, source)])
    log = read_log(tmp_path / "run")
    assert log[0]["event"] == "start" and log[0]["started_from"]["path"] == str(source.resolve())
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 4]
    assert evals[-1]["train"]["spatial"] < evals[0]["train"]["spatial"], evals
    final = load_checkpoint(tmp_path / "run" / "ckpt-0000004.pt")
    assert final["started_from"] == log[0]["started_from"] and final["iter_num"] == 4
    assert final["model_config"]["activation"] == src.config.activation


def test_a_run_started_from_a_model_resumes_with_its_record(sources, tmp_path):
    source, data = sources["checkpoint"]
    run_in_process([PYTHON, "train.py", *run_args(data, tmp_path, source, max_iters=2, save_interval=2)])
    run_in_process([PYTHON, "train.py", *run_args(data, tmp_path, "resume", max_iters=4, save_interval=2)])
    first, last = (load_checkpoint(tmp_path / "run" / f"ckpt-000000{i}.pt") for i in (2, 4))
    assert last["started_from"] == first["started_from"] and first["started_from"]["kind"] == "pretrain"


@pytest.fixture(scope="module")
def nonperm(tmp_path_factory):
    path = tmp_path_factory.mktemp("nonperm") / "nonperm.pt"
    import_research.main([f"ckpt={FIXTURE_RESEARCH / 'ckpt-preresid.pt'}",
                          f"positions={FIXTURE_RESEARCH / 'positions-preresid-nonperm'}", f"out={path}"])
    return path


def test_a_non_permutation_layout_needs_new_positions(nonperm, sources, tmp_path):
    data = sources["research"][1]
    ran = run_main(train, run_args(data, tmp_path, nonperm))
    one_error_line(ran, "not a permutation", "position_dir=")
    assert not (tmp_path / "run").exists()
    run_in_process([PYTHON, "init_pos.py", "layout=random", "n_layer=2", "n_embed=36", "seed=5",
                    f"out={tmp_path / 'pos'}"])
    run_in_process([PYTHON, "train.py", *run_args(data, tmp_path, nonperm, max_iters=1, position_dir=tmp_path / "pos")])
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-0000001.pt")
    assert np.array_equal(ckpt["model"]["sheet.unit_coords"].numpy(), np.load(tmp_path / "pos" / "positions.npy"))
    assert ckpt["layout"]["permutation"]


def char_data(root):
    folder = write_pattern_data(root / "chars", vocab=64, n_train=2000, n_val=500)
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "tokenizer": "char"}))
    return folder


@pytest.mark.parametrize("case, fragments", [
    ("shape", ("n_layer=3 on the command line vs 2", "another shape")),
    ("vocabulary", ("vocab_size=64", "token id")),
    ("tokenizer", ("gpt2 token ids", "char ids")),
    ("missing", ("checkpoint not found",)),
    ("positions", ("position set", "n_embed=36")),
])
def test_what_does_not_fit_is_refused_before_anything_is_written(sources, case, fragments, tmp_path):
    ckpt, gpt2_data = sources["checkpoint"]
    research = sources["research"][0]
    extra = {}
    if case == "positions":
        run_in_process([PYTHON, "init_pos.py", "layout=random", "n_layer=2", "n_embed=49", "seed=5",
                        f"out={tmp_path / 'pos'}"])
        extra = {"position_dir": tmp_path / "pos"}
    init_from, data = {"vocabulary": (research, gpt2_data), "tokenizer": (ckpt, char_data(tmp_path)),
                       "missing": (tmp_path / "nothing.pt", gpt2_data)}.get(case, (ckpt, gpt2_data))
    args = run_args(data, tmp_path / "out", init_from, **extra) + (["n_layer=3"] if case == "shape" else [])
    one_error_line(run_main(train, args), *fragments)
    assert not (tmp_path / "out").exists()


REFUSED_CONFIGS = [
    ("n_inner", 100), ("layer_norm_epsilon", 1e-6), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("tie_word_embeddings", False),
    ("activation_function", "relu"), ("model_type", "gpt_neo"), ("add_cross_attention", True), ("n_head", 5),
]


@pytest.mark.parametrize("key, value", REFUSED_CONFIGS)
def test_a_config_that_is_not_model_py_is_refused_naming_its_key(hf_gpt2, sources, key, value, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(hf_gpt2[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    one_error_line(run_main(train, run_args(sources["hf"][1], tmp_path / "out", folder)), f"{key}=")
    assert not (tmp_path / "out").exists()
    one_error_line(run_main(export_hf, [f"ckpt={folder}", f"out={tmp_path / 'export'}"]), f"{key}=")
