"""import_research.py: checkpoints written by the research code itself (tests/fixtures/research-ckpt-small:
2 layers, 6x6 sheets, vocabulary 64, with_resid false and true, a non-permutation layout) converted and
checked against the research code's own logits and coordinates; the restricted unpickler; non-permutation
layouts kept, refused by the spatial loss only, and carried through sampling, finetuning and export by a
model with GPT-2's vocabulary."""
import json
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import import_research
import sample
from topolm.checkpoint import build_gpt, load_checkpoint, load_model, make_payload, save_checkpoint
from topolm.config import UserError
from topolm.tokenizer import gpt2_encoding
from conftest import PYTHON, REPO, run_in_process
from topolm.research import load_pickle, load_torch_zip, read_research_checkpoint
from topolm.swap import swap_optimize
from model import GPT, GPTConfig
from positions import neighborhood_units, site_names

FIXTURE = REPO / "tests" / "fixtures" / "research-ckpt-small"
# (checkpoint, positions folder) of each conversion; "nonperm" is the preresid model with a pre-optimized layout
CASES = {"preresid": ("preresid", "positions-preresid"), "nonperm": ("preresid", "positions-preresid-nonperm"),
         "resid": ("resid", "positions-resid")}
# best_val_loss as the research code's estimate_loss gave it at iteration 5
BEST_VAL_LOSS = {"preresid": 5.0254, "resid": 4.9028}


def fixture_coords(folder: Path) -> np.ndarray:
    """The coordinates in the fixture's pickles, read without unpickling: the first tensor of each
    LayerPositions is `coordinates`, stored as torch's legacy format inside a BINBYTES payload, whose
    last 36 x 2 float32 values follow their element count (int64)."""
    out = []
    for name in site_names(2):
        data = (folder / f"{name}.pkl").read_bytes()
        payload = next(arg for op, arg, _ in pickletools.genops(data) if op.name in ("BINBYTES", "SHORT_BINBYTES"))
        n = 36 * 2
        assert struct.unpack("<q", payload[-4 * n - 8:-4 * n])[0] == n
        out.append(np.frombuffer(payload[-4 * n:], dtype="<f4").reshape(36, 2))
    return np.stack(out)


def fixture_array(name: str, suffix: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURE / f"{name}-{suffix}.npy"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    paths = {}
    for case, (suffix, folder) in CASES.items():
        paths[case] = root / f"{case}.pt"
        import_research.main([f"ckpt={FIXTURE / f'ckpt-{suffix}.pt'}", f"positions={FIXTURE / folder}",
                              f"out={paths[case]}"])
    return paths


def full_logits(model, ids):
    with torch.no_grad():
        return model.lm_head(model.encode(ids, spatial=False)[0])


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_reproduces_the_research_logits_and_coordinates(imported, case):
    suffix, folder = CASES[case]
    model, ckpt, _ = load_model(imported[case])
    logits = full_logits(model, fixture_array("input_ids", suffix))[:, -4:]
    assert (logits - fixture_array("logits", suffix)).abs().max().item() < 1e-5
    coords = ckpt["model"]["sheet.unit_coords"].numpy()
    np.testing.assert_array_equal(coords, fixture_coords(FIXTURE / folder))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embed, c.block_size, c.vocab_size, c.bias) == (2, 2, 36, 32, 64, False)
    assert (c.with_resid, c.alpha, c.radius, c.neighborhoods_per_batch, c.accum) == (suffix == "resid", 2.5, 2, 3, "mean")
    assert ckpt["kind"] == "imported" and ckpt["iter_num"] == 5
    assert ckpt["tokenizer"] is None  # a 64-token vocabulary: token ids only
    assert ckpt["research"]["best_val_loss"] == pytest.approx(BEST_VAL_LOSS[suffix], abs=1e-4)
    assert ckpt["research"]["with_resid_in_model_args"] is True
    assert ckpt["research"]["config"]["gradient_accumulation_steps"] == "5 * 4"  # an expression stays text
    dataset = ckpt["research"]["config"]["dataset"]  # a plain name in the research config: kept as the data field
    assert isinstance(dataset, str) and ckpt["data"] == {"dataset": dataset, "path": None, "tokenizer": None}
    distinct = [len(np.unique(site, axis=0)) for site in coords]
    if case == "nonperm":
        assert not ckpt["layout"]["permutation"] and distinct == [33] * 4 and not model.sheet.permutation
    else:
        assert ckpt["layout"]["permutation"] and distinct == [36] * 4


def test_each_checkpoints_sites_follow_its_with_resid(imported):
    """with_resid changes what the spatial loss sees, not the network: the sites are the sublayer
    outputs (false) or the residual stream after each addition (true)."""
    ids = fixture_array("input_ids", "resid")
    for case, after_add in (("preresid", False), ("resid", True)):
        model, _, _ = load_model(imported[case])
        acts = model.site_activations(ids)
        x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.size(1)))
        block = model.transformer.h[0]
        attn = block.attn(block.ln_1(x))
        torch.testing.assert_close(acts["layer.0.attn"], (x + attn if after_add else attn).detach())


def test_non_permutation_layout_refused_for_the_spatial_loss_only(imported):
    ids = fixture_array("input_ids", "preresid")
    targets = torch.roll(ids, -1, 1)
    ok = build_gpt(load_checkpoint(imported["preresid"]))
    _, losses = ok(ids, targets, generator=torch.Generator().manual_seed(0))
    assert 0 < losses.spatial.item() < 2.5 * 4  # alpha 2.5, four sites, SL in [0, 1]
    bad = build_gpt(load_checkpoint(imported["nonperm"]))
    with pytest.raises(ValueError, match="not a permutation of the grid"):
        bad(ids, targets)
    with pytest.raises(ValueError, match="not a permutation"):
        swap_optimize(bad.sheet.unit_coords.numpy(), np.eye(36)[None].repeat(4, 0), 2, 1, 1, False, 0)
    with pytest.raises(ValueError, match="not a permutation"):
        neighborhood_units(bad.sheet.unit_coords.numpy(), 6, 2)
    # analysis: every site's activations, and the positions exactly as imported
    acts = bad.site_activations(ids)
    assert list(acts) == bad.site_names and all(a.shape == (2, 32, 36) for a in acts.values())
    torch.testing.assert_close(full_logits(bad, ids), full_logits(ok, ids), rtol=0, atol=0)  # same weights


def test_export_of_an_imported_model_gives_the_research_logits(imported, tmp_path):
    pytest.importorskip("transformers")
    import export_hf
    from transformers import GPT2LMHeadModel

    export_hf.main([f"ckpt={imported['nonperm']}", f"out={tmp_path / 'hf'}"])
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        logits = hf(fixture_array("input_ids", "preresid")).logits[:, -4:]
    assert (logits - fixture_array("logits", "preresid")).abs().max().item() < 1e-5
    np.testing.assert_array_equal(np.load(tmp_path / "hf" / "positions.npy"),
                                  fixture_coords(FIXTURE / CASES["nonperm"][1]))
    meta = json.loads((tmp_path / "hf" / "topolm.json").read_text())
    assert meta["layout"]["permutation"] is False and meta["with_resid"] is False
    assert not (tmp_path / "hf" / "tokenizer.json").exists()  # token ids only


# ----------------------------------------------------------------------------- GPT-2 text on that layout


@pytest.fixture(scope="module")
def gpt2_nonperm(gpt2_run, tmp_path_factory):
    """The session's GPT-2 model (2 layers, 6x6 sheets, as the fixture) with its unit positions replaced by
    the fixture's non-permutation layout, written in this project's format."""
    ckpt = load_checkpoint(gpt2_run.ckpt)
    coords = fixture_coords(FIXTURE / CASES["nonperm"][1])
    assert coords.shape == tuple(ckpt["model"]["sheet.unit_coords"].shape) == (4, 36, 2)
    gpt = GPT(GPTConfig(**ckpt["model_config"]), positions=coords.astype(np.int64))
    gpt.load_state_dict({**ckpt["model"], "sheet.unit_coords": gpt.sheet.unit_coords})
    path = tmp_path_factory.mktemp("nonperm") / "ckpt-nonperm.pt"
    save_checkpoint(make_payload(gpt, kind="pretrain", config=ckpt["config"], iter_num=ckpt["iter_num"],
                                 tokenizer=ckpt["tokenizer"], layout_source="research fixture, pre-optimized"), path)
    assert not load_checkpoint(path)["layout"]["permutation"]
    return path


def test_sampling_text_from_a_non_permutation_layout(gpt2_nonperm, capsys):
    sample.main([f"ckpt={gpt2_nonperm}", "start=The dog", "num_samples=1", "max_new_tokens=4", "top_k=1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# samples from {gpt2_nonperm}"
    model, _, _ = load_model(gpt2_nonperm)  # top_k=1: the greedy continuation, worked out here
    enc = gpt2_encoding()
    ids = enc.encode("The dog")
    for _ in range(4):
        ids.append(int(full_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert out[1] == enc.decode([t for t in ids if t < enc.n_vocab])


def test_finetuning_a_non_permutation_layout_needs_alpha_scale_0(gpt2_nonperm, tmp_path):
    glue = tmp_path / "glue" / "sst2"
    glue.mkdir(parents=True)
    rows = [{"sentence": f"{w} film number {i}", "label": int(w == "good")} for i, w in
            enumerate(["good", "bad"] * 24)]
    for split, part in (("train", rows[:32]), ("validation", rows[32:])):
        (glue / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    args = [f"ckpt={gpt2_nonperm}", "task=sst2", f"data_dir={tmp_path / 'glue'}", f"out_dir={tmp_path / 'ft'}",
            "max_length=16", "batch_size=8", "max_iters=2", "device=cpu", "dtype=float32", "log_interval=1"]
    with pytest.raises(UserError, match="finetuning with alpha_scale=1 needs the spatial loss, but the unit "
                                        "positions are not a permutation.*pass alpha_scale=0"):
        finetune.main(["finetune_glue.yaml", *args])
    assert not (tmp_path / "ft").exists()
    finetune.main(["finetune_glue.yaml", *args, "alpha_scale=0"])
    metrics = json.loads((tmp_path / "ft" / "sst2" / "metrics.json").read_text())
    assert metrics["iters"] == 2 and metrics["splits"]["validation"]["spatial"] == 0.0
    tuned = load_checkpoint(tmp_path / "ft" / "sst2" / "ckpt-best.pt")
    assert not tuned["layout"]["permutation"]
    assert torch.equal(tuned["model"]["sheet.unit_coords"], load_checkpoint(gpt2_nonperm)["model"]["sheet.unit_coords"])


def test_export_of_a_non_permutation_layout_carries_it(gpt2_nonperm, tmp_path):
    pytest.importorskip("transformers")
    import export_hf
    from transformers import AutoTokenizer, GPT2LMHeadModel

    export_hf.main([f"ckpt={gpt2_nonperm}", f"out={tmp_path / 'hf'}"])
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    ids = torch.tensor([tok("The dogs run. The cat sleeps.")["input_ids"]])
    ours, _, _ = load_model(gpt2_nonperm)
    with torch.no_grad():
        assert (hf(ids).logits - full_logits(ours, ids)).abs().max().item() < 1e-5
    np.testing.assert_array_equal(np.load(tmp_path / "hf" / "positions.npy"),
                                  fixture_coords(FIXTURE / CASES["nonperm"][1]))
    meta = json.loads((tmp_path / "hf" / "topolm.json").read_text())
    assert meta["layout"]["permutation"] is False and meta["with_resid"] is False


# ----------------------------------------------------------------------------- the restricted unpickler

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"coordinates": Evil(marker)}))
    with pytest.raises(UserError, match=r"it names (posix|nt)\.system"):
        load_pickle(tmp_path / "evil.pkl")
    torch.save({"model": {}, "model_args": {"n_layer": Evil(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"it names (posix|nt)\.system"):
        load_torch_zip(tmp_path / "evil.pt")
    (tmp_path / "eval.pkl").write_bytes(pickle.dumps(eval))
    with pytest.raises(UserError, match="it names builtins.eval"):
        load_pickle(tmp_path / "eval.pkl")
    assert not marker.exists()


def synthetic_research_checkpoint(path, research, drop=(), **changes):
    """A checkpoint in the research format with other model_args, written by torch.save with a real
    OmegaConf config (the reader must turn omegaconf's current pickles into plain data as well)."""
    from omegaconf import OmegaConf

    args = {k: v for k, v in {**research["model_args"], **changes}.items() if k not in drop}
    config = OmegaConf.create({"radius": changes.get("config_radius", 2), "neighborhoods_per_batch": 3,
                               "out_dir": "'out/'", "nested": {"n_layer": 2}})
    torch.save({"model": research["model"], "optimizer": {}, "model_args": args, "iter_num": 7,
                "best_val_loss": torch.tensor(3.5), "config": config}, path)
    return path


@pytest.fixture(scope="module")
def research():
    return read_research_checkpoint(FIXTURE / "ckpt-preresid.pt")


def test_older_checkpoint_without_with_resid_takes_sites_after_the_residual_add(research, tmp_path):
    path = synthetic_research_checkpoint(tmp_path / "old.pt", research, drop=("with_resid",))
    import_research.main([f"ckpt={path}", f"positions={FIXTURE / 'positions-preresid'}", f"out={tmp_path / 'ours.pt'}"])
    model, ckpt, _ = load_model(tmp_path / "ours.pt")
    assert model.config.with_resid is True and ckpt["research"]["with_resid_in_model_args"] is False
    assert ckpt["research"]["config"] == {"radius": 2, "neighborhoods_per_batch": 3, "out_dir": "'out/'",
                                          "nested": {"n_layer": 2}}
    ids, expected = fixture_array("input_ids", "preresid"), fixture_array("logits", "preresid")
    assert (full_logits(model, ids)[:, -4:] - expected).abs().max().item() < 1e-5  # sites do not change logits
    acts = model.site_activations(ids)
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(32))
    block = model.transformer.h[0]
    torch.testing.assert_close(acts["layer.0.attn"], (x + block.attn(block.ln_1(x))).detach())


@pytest.mark.parametrize("changes,match", [
    (dict(head_loss=True), "model_args head_loss=True; this trainer has no head_loss"),
    (dict(attn_proj=True), "model_args attn_proj=True; this trainer has no attn_proj"),
    (dict(activation_decay=0.1), "activation_decay=0.1; this trainer has no activation decay.*ignore_activation_decay"),
    (dict(config_radius=3), "gives radius=2 but the checkpoint's config says radius=3"),
    (dict(n_embed=49), "transformer.wte.weight has shape \\(64, 36\\) but model_args vocab_size=64, n_embed=49"),
])
def test_what_cannot_be_converted_is_refused(research, tmp_path, changes, match):
    path = synthetic_research_checkpoint(tmp_path / "r.pt", research, **changes)
    with pytest.raises(UserError, match=match):
        import_research.main([f"ckpt={path}", f"positions={FIXTURE / 'positions-preresid'}", f"out={tmp_path / 'o.pt'}"])
    assert not (tmp_path / "o.pt").exists()


def test_activation_decay_can_be_ignored_for_analysis(research, tmp_path):
    path = synthetic_research_checkpoint(tmp_path / "r.pt", research, activation_decay=0.1)
    import_research.main([f"ckpt={path}", f"positions={FIXTURE / 'positions-preresid'}", f"out={tmp_path / 'o.pt'}",
                          "ignore_activation_decay=true"])
    assert load_checkpoint(tmp_path / "o.pt")["research"]["model_args"]["activation_decay"] == 0.1


def test_command_line_errors_are_one_line(tmp_path):
    proc = run_in_process([PYTHON, "import_research.py", f"ckpt={FIXTURE / 'ckpt-preresid.pt'}",
                       f"positions={tmp_path / 'nowhere'}", f"out={tmp_path / 'o.pt'}"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: positions folder not found: {tmp_path / 'nowhere'}"]
    with pytest.raises(UserError, match="is not a checkpoint"):
        import_research.main([f"ckpt={FIXTURE / 'README.md'}", f"positions={FIXTURE / 'positions-preresid'}",
                              f"out={tmp_path / 'o.pt'}"])
    # our own loader says where research checkpoints go
    with pytest.raises(UserError, match="convert it with import_research.py"):
        load_checkpoint(FIXTURE / "ckpt-preresid.pt")
