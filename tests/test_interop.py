"""Hugging Face export (exact logits and tokenizer through transformers offline), BLiMP scoring (local
files; the same pairs through the export), and unit ablation at the sites."""
import itertools
import math
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ablate
import blimp
import export_hf
from topolm.checkpoint import find_checkpoint, load_checkpoint, load_model, make_payload, save_checkpoint
from topolm.config import UserError
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding
from conftest import GPT2_TINY, NOUNS, PYTHON, UNSEEN, VERBS, overrides, run_in_process, run_script, write_units
from topolm.hf import _TRANSPOSED, export_hf as export_model, load_hf_sheet
from topolm.provenance import code_version, weights_digest
from model import GPT, GPTConfig
from positions import random_layout
from topolm.ablation import top_units, validation_loss, zeroed_units
from topolm.batching import min_rows
from topolm.blimp import encode_sentences, gpt_logits, load_blimp_local, sequence_logprobs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def grammar(gpt2_run, tmp_path_factory):
    """The session's tiny TopoLM (conftest.gpt2_run: GPT-2's vocabulary, trained on the grammar corpus),
    copied so that what the tests write beside its checkpoint stays here; its pairs; its export."""
    root = tmp_path_factory.mktemp("grammar")
    shutil.copytree(gpt2_run.run, root / "run")
    export_hf.main([f"ckpt={root / 'run'}", f"out={root / 'hf'}"])
    return {"root": root, "run": root / "run", "data": gpt2_run.data, "pairs": gpt2_run.pairs, "hf": root / "hf"}


def hf_model(folder):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()


# ----------------------------------------------------------------------------- export


def test_exported_model_gives_our_logits_through_transformers(grammar):
    ours, _, _ = load_model(grammar["run"])
    hf = hf_model(grammar["hf"])
    ids = torch.randint(0, 50304, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - gpt_logits(ours)(ids)).abs().max().item()
    assert diff < 1e-5
    config = json.loads((grammar["hf"] / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["layer_norm_epsilon"] == 1e-5
    assert (config["n_positions"], config["vocab_size"], config["n_embd"], config["tie_word_embeddings"]) == \
        (GPT2_TINY["block_size"], 50304, 36, True)
    from safetensors import safe_open
    with safe_open(str(grammar["hf"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to transformer.wte.weight
        assert f.get_tensor("transformer.h.0.mlp.c_fc.bias").abs().max() == 0  # bias=False exports zeros
        torch.testing.assert_close(f.get_tensor("transformer.h.1.attn.c_attn.weight"),
                                   ours.transformer.h[1].attn.c_attn.weight.detach().t(), rtol=0, atol=0)


def test_checkpoint_and_export_share_the_weights_digest(grammar):
    """The digest recorded in topolm.json is the checkpoint's, and the GPT rebuilt from the Hugging Face
    weights (Conv1D matrices transposed back, positions from positions.npy) has the same digest."""
    ckpt_file = find_checkpoint(grammar["run"])
    ckpt = load_checkpoint(ckpt_file)
    digest = weights_digest(ckpt["model"])
    meta = json.loads((grammar["hf"] / "topolm.json").read_text())
    assert meta["provenance"] == {"checkpoint": str(ckpt_file), "kind": "pretrain", "step": 12,
                                  "weights_sha256": digest, "code_version": code_version()}
    hf_weights = hf_model(grammar["hf"]).state_dict()
    coords, _ = load_hf_sheet(grammar["hf"])
    rebuilt = {}
    for key in ckpt["model"]:
        if key == "sheet.unit_coords":
            rebuilt[key] = torch.as_tensor(coords)
        else:
            rebuilt[key] = hf_weights[key].t() if key.endswith(_TRANSPOSED) else hf_weights[key]
    assert weights_digest(rebuilt) == digest
    ours, _, _ = load_model(grammar["run"])
    assert weights_digest(ours) == digest  # the loaded GPT, as the commands record it
    rebuilt["transformer.h.0.mlp.c_fc.weight"] = rebuilt["transformer.h.0.mlp.c_fc.weight"].clone()
    rebuilt["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1e-6
    assert weights_digest(rebuilt) != digest


def test_code_version_is_the_commit_or_unknown(tmp_path, monkeypatch):
    import subprocess
    from conftest import REPO
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a clone: its commit; an unpacked copy: no repository
        assert code_version.__wrapped__(REPO) == head.stdout.strip()
    assert code_version.__wrapped__(tmp_path) == "unknown"  # a folder that is not a repository's top level

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    assert code_version.__wrapped__(REPO) == "unknown"


def test_exported_tokenizer_encodes_like_ours(grammar):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(grammar["hf"]), local_files_only=True)
    enc = gpt2_encoding()
    texts = ["The dog runs.", "Hello world!  Two  spaces, tabs\tand\nnew lines\n\n", "naïve café, 1234567 ünïcödé 😀",
             " leading space and trailing ", "it's we'll they're", "x" * 300, "a<|endoftext|>b"]
    for text in texts:
        assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
    assert tok.eos_token_id == EOT_TOKEN and tok.model_max_length == GPT2_TINY["block_size"]
    assert "local_files_only" not in json.loads((grammar["hf"] / "tokenizer_config.json").read_text())


def hook_site(hf, spec: dict, got: dict, name: str):
    """A hook at topolm.json's `spec` for one site ({module, io, index}) that stores the site's tensor in got[name]."""
    module = hf.get_submodule(spec["module"])  # exactly that name, or AttributeError
    index = spec["index"]

    def pick(values):
        if index is None:
            assert isinstance(values, torch.Tensor), (spec, type(values))
            got[name] = values
        else:
            assert isinstance(values, tuple), (spec, type(values))
            got[name] = values[index]
    if spec["io"] == "input":
        return module.register_forward_pre_hook(lambda m, args: pick(args))
    assert spec["io"] == "output", spec
    return module.register_forward_hook(lambda m, args, out: pick(out))


@pytest.mark.parametrize("with_resid,bias", [(False, False), (True, True)])
def test_documented_hook_points_give_our_site_activations(grammar, tmp_path, with_resid, bias):
    """topolm.json's site_modules say where each site is in the Hugging Face model ({module, io, index}):
    forward hooks and pre-hooks at exactly those module names give our activations."""
    if (with_resid, bias) == (False, False):
        ours, ckpt, _ = load_model(grammar["run"])
        folder = grammar["hf"]
    else:  # a model with biases and sites after the residual add, built here (token ids only: no tokenizer)
        torch.manual_seed(1)
        ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=100, radius=2,
                             neighborhoods_per_batch=3, with_resid=with_resid, bias=bias), random_layout(4, 36, 3))
        for p in ours.parameters():  # non-zero biases and gains
            p.data.add_(0.1 * torch.randn_like(p))
        ours.eval()
        ckpt = make_payload(ours, kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="test",
                            data={"dataset": "test", "path": None, "tokenizer": None})
        folder = tmp_path / "hf"
        files = export_model(ours, ckpt, folder, "test")
        assert "tokenizer.json" not in files and "positions.npy" in files
    coords, meta = load_hf_sheet(folder)
    np.testing.assert_array_equal(coords, ours.sheet.unit_coords.numpy())
    assert meta["sites"] == ours.site_names and meta["with_resid"] == with_resid
    assert meta["model_config"] == ckpt["model_config"] and GPTConfig(**meta["model_config"]) == ours.config
    assert meta["data"] == ckpt["data"] and meta["data"] is not None
    assert meta["provenance"]["weights_sha256"] == weights_digest(ours)
    expected_modules = {}
    for i in range(ours.config.n_layer):
        block = f"transformer.h.{i}"
        expected_modules[f"layer.{i}.attn"] = ({"module": f"{block}.ln_2", "io": "input", "index": 0} if with_resid
                                               else {"module": f"{block}.attn", "io": "output", "index": 0})
        expected_modules[f"layer.{i}.mlp"] = {"module": block if with_resid else f"{block}.mlp", "io": "output",
                                              "index": None}
    assert meta["site_modules"] == expected_modules and list(meta["site_modules"]) == ours.site_names
    hf = hf_model(folder)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    got = {}
    handles = [hook_site(hf, spec, got, name) for name, spec in meta["site_modules"].items()]
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    expected = ours.site_activations(ids)
    for name in ours.site_names:
        assert got[name].shape == (2, 16, 36)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (hf(ids).logits - gpt_logits(ours)(ids)).abs().max().item() < 1e-5


# TransformerLens's TransformerBridge on an exported folder: its hook caches for the given ids, saved as .npz,
# raw (the Hugging Face weights as they are), then in compatibility mode with and without weight processing
TRANSFORMER_LENS_RUN = """
import sys
import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge
folder, ids_file, out = sys.argv[1:]
ids = torch.from_numpy(np.load(ids_file))
caches = {}
for mode in ("raw", "compatibility", "no_processing"):
    bridge = TransformerBridge.boot_transformers(folder, device="cpu")
    if mode != "raw":
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=mode == "no_processing")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    caches[f"{mode}/logits"] = logits.numpy()
    for key in cache.keys():
        if key.endswith(("hook_attn_out", "hook_mlp_out", "hook_resid_mid", "hook_resid_post")):
            caches[f"{mode}/{key}"] = cache[key].numpy()
np.savez(out, **caches)
"""
# the hook that holds each kind of site, by with_resid
TL_HOOKS = {False: {"attn": "hook_attn_out", "mlp": "hook_mlp_out"},
            True: {"attn": "hook_resid_mid", "mlp": "hook_resid_post"}}


@pytest.mark.transformer_lens
@pytest.mark.parametrize("with_resid", [False, True])
def test_transformer_lens_hooks_are_the_sites_without_weight_processing(grammar, tmp_path, with_resid):
    """TransformerLens 4.3 (requirements-dev.txt) boots the export (TransformerBridge.boot_transformers, offline):
    blocks.i.hook_attn_out / hook_mlp_out (with_resid=false) and hook_resid_mid / hook_resid_post
    (with_resid=true) equal our sites within 1e-5 on the raw weights and in compatibility mode with
    no_processing; the default compatibility mode (layer norm folded, weights centred) gives other numbers."""
    pytest.importorskip("transformer_lens")
    ours, ckpt, _ = load_model(grammar["run"])
    folder = grammar["hf"]
    if with_resid:  # the same weights with the sites after the residual additions
        import dataclasses
        resid = GPT(dataclasses.replace(ours.config, with_resid=True)).eval()
        resid.load_state_dict(ours.state_dict())
        folder = tmp_path / "hf-resid"
        export_model(resid, make_payload(resid, kind="pretrain", config={}, iter_num=12, tokenizer=ckpt["tokenizer"],
                                         layout_source="test"), folder, "test")
        ours = resid
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "ids.npy", ids.numpy())
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run_script([PYTHON, "-c", TRANSFORMER_LENS_RUN, str(folder), str(tmp_path / "ids.npy"), str(tmp_path / "tl.npz")],
               env=env, timeout=600)
    got = dict(np.load(tmp_path / "tl.npz"))
    with torch.no_grad():
        expected = ours.site_activations(ids)
        logits = gpt_logits(ours)(ids).numpy()
    processed = []
    for name in ours.site_names:
        _, layer, kind = name.split(".")
        hook = f"blocks.{layer}.{TL_HOOKS[with_resid][kind]}"
        for mode in ("raw", "no_processing"):
            np.testing.assert_allclose(got[f"{mode}/{hook}"], expected[name].numpy(), rtol=0, atol=1e-5)
        processed.append(np.abs(got[f"compatibility/{hook}"] - expected[name].numpy()).max())
    assert min(processed) > 1e-3  # folded layer norms and centred weights: other activations
    assert np.abs(got["raw/logits"] - logits).max() < 1e-5


def test_export_refuses_to_overwrite(grammar):
    with pytest.raises(UserError, match="already exists; pass overwrite=true"):
        export_hf.main([f"ckpt={grammar['run']}", f"out={grammar['hf']}"])


# ----------------------------------------------------------------------------- BLiMP


def test_blimp_on_local_files_and_the_same_pairs_through_the_export(grammar, tmp_path, capsys):
    out = tmp_path / "blimp.json"
    blimp.main([f"ckpt={grammar['run']}", f"data_dir={grammar['pairs']}", f"out={out}", "save_pairs=true",
                "batch_size=5"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["paradigms"]["known_verb"] == {"accuracy": 1.0, "n": 8, "not_scorable": 0, "phenomenon": "lexicon",
                                                 "field": "semantics"}
    assert result["paradigms"]["word_order"]["accuracy"] == 1.0 and result["phenomena"]["word_order"]["n"] == 8
    assert result["overall"]["accuracy"] == 1.0 and result["overall"]["n"] == 16
    assert "mean over paradigms" in printed and "known_verb" in printed
    assert result["provenance"]["weights_sha256"] == weights_digest(load_model(grammar["run"])[0])
    assert result["provenance"]["step"] == 12 and result["provenance"]["checkpoint"] == result["checkpoint"]

    # the same pairs scored independently through transformers: its tokenizer, its model, the EOT prefix
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(grammar["hf"]), local_files_only=True)
    hf = hf_model(grammar["hf"])
    rows = [json.loads(line) for name in ("known_verb", "word_order")
            for line in (grammar["pairs"] / f"{name}.jsonl").read_text().splitlines()]

    def hf_logprob(sentence):
        ids = torch.tensor([[tok.eos_token_id] + tok(sentence)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        return float(logp.gather(-1, ids[0, 1:, None]).sum())
    good = np.array([hf_logprob(r["sentence_good"]) for r in rows])
    bad = np.array([hf_logprob(r["sentence_bad"]) for r in rows])
    np.testing.assert_allclose(result["pairs"]["lp_good"], good, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result["pairs"]["lp_bad"], bad, atol=1e-4, rtol=0)
    assert ((good > bad) == (np.array(result["pairs"]["lp_good"]) > np.array(result["pairs"]["lp_bad"]))).all()


# lm-eval's harness over a task of local jsonl pairs: lm-eval's own BLiMP template (tasks/blimp/_template_yaml)
# with the Hub dataset replaced by the files; the built-in tasks are not indexed (include_defaults=False: 1 s,
# against about 15 s for indexing them all). Prints each pair's two log-likelihoods as JSON.
LM_EVAL_RUN = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks = sys.argv[1], sys.argv[2]
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["topolm_pairs"],
                              task_manager=TaskManager(include_path=tasks, include_defaults=False),
                              batch_size=1, device="cpu", log_samples=True)
samples = sorted(res["samples"]["topolm_pairs"], key=lambda x: x["doc_id"])
print(json.dumps({"contexts": [[list(a) for a in x["arguments"]] for x in samples],
                  "ll": [[r[0] for r in x["filtered_resps"]] for x in samples],
                  "acc": res["results"]["topolm_pairs"]["acc,none"]}))
"""


def lm_eval_task(folder, files):
    """A task folder for lm-eval: `topolm_pairs`, lm-eval's BLiMP template reading `files` (BLiMP-format jsonl,
    their rows in order) as its one split."""
    import importlib.util
    template = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "blimp" / "_template_yaml"
    folder.mkdir()
    data_files = "".join(f"      - {f}\n" for f in files)
    (folder / "topolm_pairs.yaml").write_text(f"include: {template}\ntask: topolm_pairs\ndataset_path: json\n"
                                              f"validation_split: train\ndataset_kwargs:\n  data_files:\n    train:\n{data_files}")
    return folder


@pytest.mark.lm_eval
def test_lm_eval_scores_the_export_as_blimp_py_with_a_leading_space(grammar, tmp_path):
    """lm-eval 0.4.13 (requirements-dev.txt) on the exported folder, offline, with lm-eval's BLiMP template over
    local pairs: each pair's decision is blimp.py's with leading_space=true, and its log-likelihoods are within
    1e-4; blimp.py's default (the sentence as written) scores other numbers."""
    pytest.importorskip("lm_eval")
    files = [grammar["pairs"] / f"{name}.jsonl" for name in ("known_verb", "word_order")]  # blimp.py's order
    tasks = lm_eval_task(tmp_path / "tasks", files)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    # a process of its own: huggingface_hub and datasets read the offline variables when imported
    proc = run_script([PYTHON, "-c", LM_EVAL_RUN, str(grammar["hf"]), str(tasks)], env=env, timeout=600)
    harness = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert harness["contexts"][0] == [["", " " + rows[0]["sentence_good"]], ["", " " + rows[0]["sentence_bad"]]]
    good, bad = np.array(harness["ll"]).T
    scored = {}
    for leading_space in ("true", "false"):
        out = tmp_path / f"blimp-{leading_space}.json"
        blimp.main([f"ckpt={grammar['run']}", f"data_dir={grammar['pairs']}", f"out={out}", "save_pairs=true",
                    f"leading_space={leading_space}"])
        scored[leading_space] = json.loads(out.read_text())["pairs"]
    ours = scored["true"]
    assert len(good) == len(ours["lp_good"]) == 16
    np.testing.assert_allclose(ours["lp_good"], good, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours["lp_bad"], bad, atol=1e-4, rtol=0)
    decisions = good > bad
    assert (decisions == (np.array(ours["lp_good"]) > np.array(ours["lp_bad"]))).all()
    assert harness["acc"] == pytest.approx(decisions.mean())
    assert np.abs(np.array(scored["false"]["lp_good"]) - good).max() > 0.1  # the other convention: other scores


def test_batched_scoring_is_unpadded_and_matches_plain_sums():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=60, radius=2,
                          neighborhoods_per_batch=3)).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (2, 9, 5, 16, 3, 7)]
    batched = sequence_logprobs(gpt_logits(model), seqs, batch_size=4)
    with torch.no_grad():
        for s, value in zip(seqs, batched):
            logits = gpt_logits(model)(torch.tensor([s]))[0]
            plain = sum(float(torch.log_softmax(logits[t - 1].double(), -1)[s[t]]) for t in range(1, len(s)))
            assert value == pytest.approx(plain, abs=1e-5)
    for batch_size in (1, 3, 64):  # the same numbers, bit for bit
        np.testing.assert_array_equal(sequence_logprobs(gpt_logits(model), seqs * 3, batch_size), np.tile(batched, 3))
    calls = []
    sequence_logprobs(lambda idx: calls.append(tuple(idx.shape)) or gpt_logits(model)(idx), seqs * 2, batch_size=4)
    # one forward pass per length, longest first, never padded; filled up to min_rows() rows with its own copies
    assert calls == [(max(2, -(-min_rows() // n)), n) for n in (16, 9, 7, 5, 3, 2)]
    with pytest.raises(UserError, match="exceeds the model's block_size=16"):
        sequence_logprobs(gpt_logits(model), [[1] * 17], 4, max_len=16)


def test_blimp_refuses_bad_inputs(grammar, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "p.jsonl").write_bytes(b'{"sentence_good": "caf\xe9", "sentence_bad": "x"}\n')
    with pytest.raises(UserError, match=r"p.jsonl line 1, byte 23: not valid UTF-8"):
        load_blimp_local(bad)
    (bad / "p.jsonl").write_text('{"sentence_good": "a"}\n')
    with pytest.raises(UserError, match="p.jsonl line 1: no field 'sentence_bad'"):
        load_blimp_local(bad)
    with pytest.raises(UserError, match="unknown BLiMP paradigm\\(s\\) wh_island"):
        load_blimp_local(grammar["pairs"], "known_verb,wh_island")
    assert load_blimp_local(grammar["pairs"], "word_order").paradigm == ["word_order"] * 8
    torch.manual_seed(0)
    small = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=64, radius=2,
                          neighborhoods_per_batch=3))
    save_checkpoint(make_payload(small, kind="pretrain", config={}, iter_num=0, tokenizer=None, layout_source="t"),
                    tmp_path / "ids.pt")
    proc = run_in_process([PYTHON, "blimp.py", f"ckpt={tmp_path / 'ids.pt'}", f"data_dir={grammar['pairs']}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("has vocab_size=64; BLiMP needs the GPT-2 vocabulary (at least 50257)")


# ----------------------------------------------------------------------------- ablation


def small_model(with_resid=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=60, radius=2,
                          neighborhoods_per_batch=3, with_resid=with_resid), random_layout(4, 36, 2)).eval()
    for p in model.parameters():  # larger weights than the init, so every unit is far from zero
        p.data.add_(0.2 * torch.randn_like(p))
    return model


def test_zeroed_units_are_exactly_the_chosen_ones():
    model = small_model()
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    intact = model.site_activations(ids)
    chosen = {"layer.0.attn": [3, 0, 35], "layer.0.mlp": [], "layer.1.mlp": list(range(10))}
    with zeroed_units(model, chosen):
        ablated = model.site_activations(ids)  # its hooks run after the zeroing hooks: they see the site's value
    for name in model.site_names:
        zero = (ablated[name] == 0).all(dim=(0, 1)).nonzero().flatten().tolist()
        assert zero == sorted(chosen.get(name, [])), name
    keep = [u for u in range(36) if u not in chosen["layer.0.attn"]]
    torch.testing.assert_close(ablated["layer.0.attn"][..., keep], intact["layer.0.attn"][..., keep], rtol=0, atol=0)
    assert not torch.equal(ablated["layer.1.attn"], intact["layer.1.attn"])  # the effect propagates
    after = model.site_activations(ids)  # hooks removed on exit
    assert all(torch.equal(after[n], intact[n]) for n in model.site_names)
    with pytest.raises(ValueError, match="unknown site"):
        with zeroed_units(model, {"layer.7.mlp": [1]}):
            pass


def manual_logits(model, ids, removed):
    """The forward pass written out, leaving the output of the sublayer `removed` = (layer, kind) out."""
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.size(1)))
    for i, block in enumerate(model.transformer.h):
        a = block.attn(block.ln_1(x))
        x = x if removed == (i, "attn") else x + a
        m = block.mlp(block.ln_2(x))
        x = x if removed == (i, "mlp") else x + m
    return model.lm_head(model.transformer.ln_f(x))


def test_zeroing_a_whole_site_removes_that_sublayer():
    model = small_model(with_resid=False)
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        intact = gpt_logits(model)(ids)
        torch.testing.assert_close(manual_logits(model, ids, None), intact, rtol=0, atol=1e-6)
        for name in model.site_names:
            layer, kind = name.split(".")[1:]
            with zeroed_units(model, {name: list(range(36))}):
                ablated = gpt_logits(model)(ids)
            torch.testing.assert_close(ablated, manual_logits(model, ids, (int(layer), kind)), rtol=0, atol=1e-6)
            assert (ablated - intact).abs().max() > 1e-3


def test_top_units_rank_by_t():
    t = np.array([[0.5, 3.0, np.nan, 3.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(top_units(t, 3), [[1, 3, 0], [4, 3, 2]])
    np.testing.assert_array_equal(top_units(t, 4), [[1, 3, 0, 4], [4, 3, 2, 1]])  # every defined unit, NaN never
    with pytest.raises(UserError, match=r"k=5: u.npz has a defined t_localizer at only 4 of 5 units of b.*k <= 4"):
        top_units(t, 5, ["b", "a"], "u.npz")


def test_ablate_selective_against_random_units(grammar, tmp_path):
    model, _, _ = load_model(grammar["run"])
    rng = np.random.default_rng(0)
    t = rng.normal(size=(4, 36))
    units = write_units(tmp_path / "units.npz", grammar["run"], t_localizer=t, selective_localizer=t > 1.0)
    out = tmp_path / "ablation.json"
    ablate.main([f"ckpt={grammar['run']}", f"units={units}", "k=6", f"data_dir={grammar['pairs']}",
                 f"dataset={grammar['data']}", "val_batches=2", "val_batch_size=4", f"out={out}", "seed=3"])
    r = json.loads(out.read_text())
    assert r["k"] == [6] and [e["k"] for e in r["sweep"]] == [6]
    entry = r["sweep"][0]
    assert r["provenance"]["weights_sha256"] == weights_digest(model) and r["units_provenance"] == r["provenance"]
    expected_top = top_units(t, 6)
    assert entry["selective"]["units"] == {name: expected_top[s].tolist() for s, name in enumerate(model.site_names)}
    assert entry["selective"]["significant_per_site"] == (np.take_along_axis(t, expected_top, 1) > 1.0).sum(1).tolist()
    draws = entry["random"]["draws"]
    assert len(draws) == 5 and len({json.dumps(d["units"]) for d in draws}) == 5
    assert all(len(set(u)) == 6 for d in draws for u in d["units"].values())
    assert entry["random"]["blimp"]["values"] == [d["blimp"] for d in draws]
    assert entry["random"]["val_loss"]["mean"] == pytest.approx(np.mean([d["val_loss"] for d in draws]))
    assert entry["random"]["val_loss"]["std"] == pytest.approx(np.std([d["val_loss"] for d in draws], ddof=1))
    # the intact condition is blimp.py's score, and the validation loss of the same windows
    assert r["intact"]["blimp"] == 1.0
    tokens = np.fromfile(grammar["data"] / "val.bin", dtype=np.uint16)
    assert r["intact"]["val_loss"] == pytest.approx(validation_loss(model, tokens, 2, 4, 3))
    # the selective condition is the model with exactly those units zeroed
    with zeroed_units(model, entry["selective"]["units"]):
        assert entry["selective"]["val_loss"] == pytest.approx(validation_loss(model, tokens, 2, 4, 3))
    assert entry["selective"]["val_loss"] != pytest.approx(r["intact"]["val_loss"])

    np.savez(units, site_names=np.array(model.site_names), coords=np.roll(model.sheet.unit_coords.numpy(), 1, 1),
             t_localizer=t, provenance=np.array(json.dumps(r["provenance"])))
    with pytest.raises(UserError, match="measured on a model with other unit positions"):
        ablate.main([f"ckpt={grammar['run']}", f"units={units}", "k=6", f"data_dir={grammar['pairs']}"])
    with pytest.raises(UserError, match="draws=2 must be >= 5"):
        ablate.main([f"ckpt={grammar['run']}", f"units={units}", "draws=2"])


def test_encode_sentences_prefixes_eot():
    assert encode_sentences(["The dog runs."], gpt2_encoding()) == [[EOT_TOKEN] + gpt2_encoding().encode("The dog runs.")]
    spaced = encode_sentences(["The dog runs."], gpt2_encoding(), leading_space=True)
    assert spaced == [[EOT_TOKEN] + gpt2_encoding().encode(" The dog runs.")] and spaced[0][1] != 464  # " The", not "The"


def test_scoring_uses_the_restricted_output_vocabulary():
    # a model with output_vocab=corpus gives -inf to other ids: BLiMP and ablation must score that model
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=1, n_embed=9, block_size=8, vocab_size=64, radius=2,
                    neighborhoods_per_batch=1, n_output_ids=5)
    model = GPT(cfg, random_layout(2, 9, seed=0), output_ids=[1, 3, 5, 7, 9]).eval()
    ids = torch.tensor([[1, 3, 5, 7]])
    with torch.no_grad():
        ours = gpt_logits(model)(ids)
        last, _ = model(ids)
    assert torch.isinf(ours[0, :, 0]).all() and torch.isfinite(ours[0, :, [1, 3, 5, 7, 9]]).all()
    torch.testing.assert_close(ours[:, -1:], last)


def test_export_never_replaces_what_is_not_an_earlier_export(grammar, tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "data.txt").write_text("precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    gpt, ckpt, path = load_model(grammar["run"])
    for out in (victim, a_file):
        with pytest.raises(UserError, match="is not an earlier export"):
            export_model(gpt, ckpt, out, str(path), overwrite=True)
    assert (victim / "sub" / "data.txt").read_text() == "precious" and a_file.read_text() == "keep me"


def test_an_empty_paradigm_list_is_refused():
    from topolm.blimp import parse_paradigms
    with pytest.raises(UserError, match="names no paradigm"):
        parse_paradigms(" , ", ["a", "b"])


# ----------------------------------------------------------------------------- a restricted output vocabulary


@pytest.fixture(scope="module")
def restricted(grammar):
    """The grammar model trained with output_vocab=corpus: the corpus holds no id 0 (GPT-2's '!'), so id 0
    and every word outside the corpus get log-probability -inf."""
    root = grammar["root"]
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(grammar["data"]), out_dir=str(root), run_name="restricted", vocab_size=50304,
                           block_size=16, batch_size=8, learning_rate=1e-2, max_iters=12, warmup_iters=2,
                           lr_decay_iters=12, min_lr=1e-3, eval_interval=12, save_interval=12, eval_iters=1,
                           output_vocab="corpus")])
    return root / "restricted"


def write_restricted_pairs(folder):
    """Pairs for the restricted model: agreement (every id in the corpus, of different lengths), a verb the
    corpus never holds on one side, and on both sides."""
    folder.mkdir(parents=True)
    agreement, one_side, both = [], [], []
    for noun, verb in itertools.product(NOUNS, VERBS):
        agreement.append({"sentence_good": f"The {noun} {verb}.", "sentence_bad": f"The {NOUNS[noun]} {verb}.",
                          "UID": "agreement", "linguistics_term": "agreement", "field": "morphology"})
        agreement.append({"sentence_good": f"The {NOUNS[noun]} {VERBS[verb]}.", "sentence_bad": f"The {verb}.",
                          "UID": "agreement", "linguistics_term": "agreement", "field": "morphology"})
        one_side.append({"sentence_good": f"The {noun} {verb}.", "sentence_bad": f"The {noun} {UNSEEN[verb]}.",
                         "UID": "unseen_verb", "linguistics_term": "lexicon", "field": "semantics"})
        both.append({"sentence_good": f"The {noun} {UNSEEN[verb]}.",
                     "sentence_bad": f"The {NOUNS[noun]} {UNSEEN[verb]}.",
                     "UID": "unseen_both", "linguistics_term": "lexicon", "field": "semantics"})
    for name, rows in (("agreement", agreement), ("unseen_verb", one_side), ("unseen_both", both)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lone_logprob(model, sentence):
    """A sentence's log-probability after <|endoftext|>, alone (no batch, no padding), summed in float64."""
    ids = torch.tensor([[EOT_TOKEN] + gpt2_encoding().encode_ordinary(sentence)])
    with torch.no_grad():
        logp = torch.log_softmax(gpt_logits(model)(ids)[0, :-1].double(), -1)
    return float(logp.gather(-1, ids[0, 1:, None]).sum())


def test_blimp_of_a_restricted_vocabulary_is_batch_size_invariant_and_skips_unscorable_pairs(restricted, tmp_path,
                                                                                              capsys):
    model, _, _ = load_model(restricted)
    assert model.config.n_output_ids and 0 not in model.output_ids.tolist()
    pairs = write_restricted_pairs(tmp_path / "pairs")
    rows = [json.loads(line) for name in ("agreement", "unseen_verb", "unseen_both")
            for line in (pairs / f"{name}.jsonl").read_text().splitlines()]
    good = np.array([lone_logprob(model, r["sentence_good"]) for r in rows])
    bad = np.array([lone_logprob(model, r["sentence_bad"]) for r in rows])
    scorable = np.isfinite(good) & np.isfinite(bad)
    assert scorable.tolist() == [True] * 8 + [False] * 8  # the reference: agreement only
    expected = float((good[scorable] > bad[scorable]).mean())
    results = {}
    for batch_size in (1, 3, 64):
        out = tmp_path / f"b{batch_size}.json"
        blimp.main([f"ckpt={restricted}", f"data_dir={pairs}", f"out={out}", "save_pairs=true",
                    f"batch_size={batch_size}"])
        results[batch_size] = json.loads(out.read_text())
        assert results[batch_size]["overall"]["accuracy"] == expected, batch_size
        assert results[batch_size]["paradigms"]["agreement"]["accuracy"] == expected
        lp = np.array(results[batch_size]["pairs"]["lp_good"][:8] + results[batch_size]["pairs"]["lp_bad"][:8])
        np.testing.assert_allclose(lp, np.concatenate([good[:8], bad[:8]]), rtol=0, atol=1e-4)
    for batch_size in (3, 64):  # the same decisions and counts whatever the batching
        for key in ("overall", "phenomena", "paradigms"):
            assert results[batch_size][key] == results[1][key], (batch_size, key)
        pairs, ref = results[batch_size]["pairs"], results[1]["pairs"]
        assert pairs["scorable"] == ref["scorable"] and pairs["paradigm"] == ref["paradigm"]
        # Not yet bit for bit on every CPU: the log-probabilities agree to float32 rounding (1e-5 nats)
        for side in ("lp_good", "lp_bad"):
            a = np.array([np.nan if v is None else v for v in pairs[side]], dtype=float)
            b = np.array([np.nan if v is None else v for v in ref[side]], dtype=float)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, equal_nan=True)
    r = results[64]
    assert r["overall"]["n"] == 16 and r["overall"]["not_scorable"] == 8 and r["overall"]["ties"] == 0
    assert r["paradigms"]["agreement"]["not_scorable"] == 0
    assert r["paradigms"]["unseen_verb"] == {"accuracy": None, "n": 4, "not_scorable": 4, "phenomenon": "lexicon",
                                             "field": "semantics"}
    assert r["paradigms"]["unseen_both"]["not_scorable"] == 4 and r["phenomena"]["lexicon"]["accuracy"] is None
    assert r["overall"]["paradigm_mean"] == expected  # the mean over the paradigms that have an accuracy
    assert r["pairs"]["lp_bad"][8:] == [None] * 8  # -inf is no JSON number
    printed = capsys.readouterr().out
    assert "not scorable" in printed and "8 of 16 pairs not scorable" in printed


def test_ablation_of_a_restricted_vocabulary_is_batch_size_invariant(restricted, grammar, tmp_path):
    model, _, _ = load_model(restricted)
    pairs = write_restricted_pairs(tmp_path / "pairs")
    t = np.random.default_rng(0).normal(size=(4, 36))
    units = write_units(tmp_path / "units.npz", restricted, t_localizer=t)
    blimp.main([f"ckpt={restricted}", f"data_dir={pairs}", f"out={tmp_path / 'blimp.json'}", "batch_size=1"])
    alone = json.loads((tmp_path / "blimp.json").read_text())["overall"]
    runs = []
    for batch_size, val_batches, val_batch_size in ((1, 8, 1), (64, 2, 4)):
        out = tmp_path / f"ablation-{batch_size}.json"
        ablate.main([f"ckpt={restricted}", f"units={units}", "k=6", f"data_dir={pairs}", f"dataset={grammar['data']}",
                     f"val_batches={val_batches}", f"val_batch_size={val_batch_size}", f"out={out}",
                     f"batch_size={batch_size}"])
        runs.append(json.loads(out.read_text()))
    for r in runs:
        assert r["intact"]["blimp"] == alone["accuracy"]
        assert math.isfinite(r["intact"]["val_loss"]) and math.isfinite(r["sweep"][0]["selective"]["val_loss"])
    # the same 8 windows, batched 8 x 1 or 2 x 4: the same losses; the same pairs at batch_size 1 or 64
    assert runs[0]["intact"] == runs[1]["intact"]
    assert runs[0]["sweep"] == runs[1]["sweep"]  # every condition, the random draws included
    assert runs[0]["not_scorable"] == runs[1]["not_scorable"] == 8 and runs[0]["n_pairs"] == 16


def test_a_nan_score_is_an_error_with_its_reason(grammar, tmp_path):
    model, ckpt, _ = load_model(grammar["run"])
    the = gpt2_encoding().encode_ordinary("The")[0]
    with torch.no_grad():
        model.transformer.wte.weight[the] = float("nan")  # every sentence starts with 'The': what follows is NaN
    save_checkpoint(make_payload(model, kind="pretrain", config=ckpt["config"], iter_num=0, tokenizer=ckpt["tokenizer"],
                                 layout_source="test"), tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"log-probability of .* is NaN"):
        blimp.main([f"ckpt={tmp_path / 'nan.pt'}", f"data_dir={grammar['pairs']}", f"out={tmp_path / 'b.json'}"])
    assert not (tmp_path / "b.json").exists()
