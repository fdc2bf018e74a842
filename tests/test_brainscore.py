"""Brain-Score language on the export (brainscore/score.py in its own environment, .venv-brainscore): what
brainscore_language records at each site of topolm.json equals our site activation at the last token of
the same text, for both with_resid settings, and its ridge metric separates a linear map of those
activations from the same map with the stimuli shuffled. The benchmarks' neural data come from S3 at
run time and are not used here."""
import ast
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import export_hf
from conftest import COMMANDS, PYTHON, REPO, one_error_line, run_script
from model import GPT
from topolm.checkpoint import load_model, make_payload
from topolm.blimp import gpt_logits
from topolm.hf import export_hf as export_model
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding

pytestmark = pytest.mark.brainscore

BRAINSCORE_VENV = REPO / os.environ.get("BRAINSCORE_VENV", ".venv-brainscore")
SENTENCES = ["The dog runs.", "The cats sleep", "A small bird sings in the old tree."]
PASSAGE = ["The dog runs.", "It barks , loudly.", "Then it sleeps !"]
# Brain-Score's context for each part (brainscore_language.model_helpers.preprocessing.prepare_context):
# the parts so far joined by single spaces, the spaces before punctuation removed; no <|endoftext|> prefix
CONTEXTS = ["The dog runs.", "The dog runs. It barks, loudly.", "The dog runs. It barks, loudly. Then it sleeps!"]


def ridge_stimuli(n: int = 80, end: str = "", seed: int = 0) -> list[str]:
    """`n` distinct sentences of one frame, each ending in `end`, in a fixed shuffled order."""
    import itertools
    words = (["old", "small", "happy", "red", "quiet"], ["dog", "cat", "bird", "horse"],
             ["sees", "likes", "finds", "hears"], ["a tree", "the river", "my house", "some bread"])
    sentences = [f"The {a} {b} {c} {d}{end}" for a, b, c, d in itertools.product(*words)]
    order = np.random.default_rng(seed).permutation(len(sentences))[:n]
    return [sentences[i] for i in order]


PLANTED, CEILING = "layer.1.attn", 0.95


@pytest.fixture(scope="module")
def exports(gpt2_run, tmp_path_factory):
    """The session's tiny trained model exported as it is (with_resid=false), and its weights with the sites
    after the residual additions (with_resid=true) exported too."""
    root = tmp_path_factory.mktemp("brainscore")
    export_hf.main([f"ckpt={gpt2_run.run}", f"out={root / 'hf-false'}"])
    ours, ckpt, _ = load_model(gpt2_run.run)
    assert not ours.config.with_resid
    resid = GPT(dataclasses.replace(ours.config, with_resid=True)).eval()
    resid.load_state_dict(ours.state_dict())
    payload = make_payload(resid, kind="pretrain", config={}, iter_num=ckpt["iter_num"], tokenizer=ckpt["tokenizer"],
                           layout_source="test", data=ckpt["data"])
    export_model(resid, payload, root / "hf-true", "test")
    return {"root": root, False: (ours, root / "hf-false"), True: (resid, root / "hf-true")}


@pytest.fixture(scope="module")
def brainscore_run(exports):
    """tests/brainscore_wiring.py run once by the Brain-Score environment's python on both exports, offline."""
    python = BRAINSCORE_VENV / "bin" / "python"
    assert python.is_file(), f"{python} is missing: make test builds it (make {BRAINSCORE_VENV.name}/.installed)"
    root = exports["root"]
    stimuli = {"sentences": SENTENCES, "passage": PASSAGE}
    ridge = {"sentences": ridge_stimuli(), "seed": 0, "neuroids": 20, "noise": 0.5}
    stories = ridge_stimuli(80, ".", seed=1)
    jobs = {"digest": [{"folder": str(exports[r][1]), "stimuli": stimuli, "out": str(root / f"digest-{r}.npz")}
                       for r in (False, True)],
            "ridge": [{"folder": str(exports[False][1]), "site": "layer.1.mlp", "stimuli": ridge,
                       "out": str(root / "ridge.json")}],
            "score": [{"folder": str(exports[False][1]), "site": PLANTED, "out": str(root / "score.json"),
                       "stimuli": {"stories": [stories[k * 8:(k + 1) * 8] for k in range(10)], "seed": 0,
                                   "neuroids": 20, "noise": 0.5, "ceiling": CEILING}}],
            "refused": [[f"model={exports[False][1]}", "benchmarks=NoSuch-ridge", f"out={root / 'refused.json'}"]],
            "refusals": str(root / "refusals.json")}
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}
    run_script([str(python), str(REPO / "tests" / "brainscore_wiring.py"), str(root / "jobs.json")], env=env,
               timeout=600)
    return {r: dict(np.load(root / f"digest-{r}.npz")) for r in (False, True)} | \
        {name: json.loads((root / f"{name}.json").read_text()) for name in ("ridge", "score", "refusals")} | \
        {"refused_written": (root / "refused.json").exists()}


def last_token(model, text: str, prefix: list[int] = ()) -> dict[str, np.ndarray]:
    """Our site activations (float32, n_embed) at the last token of `text` (GPT-2 BPE, after `prefix`)."""
    ids = torch.tensor([[*prefix, *gpt2_encoding().encode_ordinary(text)]])
    with torch.no_grad():
        return {name: a[0, -1].numpy() for name, a in model.site_activations(ids).items()}


@pytest.mark.parametrize("with_resid", [False, True])
def test_brainscore_records_our_site_activations_at_the_last_token(exports, brainscore_run, with_resid):
    """Each sentence digested alone, and each part of a three-part passage (Brain-Score runs the context so far
    and keeps its last token), equal our sites within 1e-5; with_resid=true's attention site (ln_2's input)
    needs score.py's pre-hook: a plain HuggingfaceSubject at ln_2 records ln_2's output instead."""
    ours, _ = exports[with_resid]
    got = brainscore_run[with_resid]
    # transformers 4.57 reads the folder written by transformers 5: our token ids, our logits
    ids = gpt2_encoding().encode_ordinary(SENTENCES[-1])
    assert got["ids"].tolist() == [ids]
    with torch.no_grad():
        np.testing.assert_allclose(got["logits"], gpt_logits(ours)(torch.tensor([ids])).numpy(), rtol=0, atol=1e-5)
    assert got["contexts"].tolist() == CONTEXTS
    alone = [last_token(ours, s) for s in SENTENCES]
    passage = [last_token(ours, c) for c in CONTEXTS]
    with_eot = [last_token(ours, s, [EOT_TOKEN]) for s in SENTENCES]
    for site in ours.site_names:
        expected = np.stack([a[site] for a in alone])
        assert got[f"{site}/alone"].shape == (3, ours.config.n_embed)
        np.testing.assert_allclose(got[f"{site}/alone"], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[f"{site}/passage"], np.stack([p[site] for p in passage]), rtol=0, atol=1e-5)
        assert np.abs(got[f"{site}/alone"] - np.stack([a[site] for a in with_eot])).max() > 1e-3  # no EOT prefix
        plain = np.abs(got[f"{site}/plain"] - expected).max()
        if with_resid and site.endswith(".attn"):
            assert plain > 1e-2, site  # ln_2's output, not the site
        else:
            assert plain < 1e-5, site  # Brain-Score's own output hook (element 0 of a tuple) is the site
    meta = json.loads((exports[with_resid][1] / "topolm.json").read_text())
    assert [got[f"{site}/layer"].tolist() for site in ours.site_names] == \
        [[meta["site_modules"][site]["module"]] for site in ours.site_names]


def test_brainscore_ridge_metric_finds_a_linear_map_and_not_its_shuffle(brainscore_run):
    """brainscore_language's ridge_pearsonr (10 splits of 90% train by stimulus_id) on 80 stimuli: a neural
    assembly that is a linear map of the site's activations plus noise (half the signal's sd: r = 0.89 at
    best) scores high; the same assembly with its stimulus_ids shuffled scores near 0."""
    r = brainscore_run["ridge"]
    assert r["n_stimuli"] == 80 and r["n_units"] == 36
    assert r["linear"]["splits"] == r["shuffled"]["splits"] == 10
    assert r["linear"]["score"] > 0.8
    assert abs(r["shuffled"]["score"]) < 0.2


def test_score_py_finds_the_site_a_synthetic_benchmark_was_made_from(exports, brainscore_run):
    """score.py's main with one benchmark: Brain-Score's Blank2014 (its own __call__: 10 stories of 8 sentences
    digested in order, ridge regression cross-validated by story in 8 group folds, divided by the ceiling)
    on a neural assembly made as a noisy linear map of one site as Brain-Score records it: every site is
    scored alone, and that site scores best."""
    r = brainscore_run["score"]
    scores = r["scores"]["synthetic-Blank2014-ridge"]
    meta = json.loads((exports[False][1] / "topolm.json").read_text())
    assert r["sites"] == meta["site_modules"] and list(scores) == meta["sites"]
    assert r["topolm"]["provenance"] == meta["provenance"]
    for value in scores.values():
        assert value["score"] == pytest.approx(min(value["raw"] / CEILING, 1.0), rel=1e-12)
    assert r["best_site"] == {"synthetic-Blank2014-ridge": {"site": PLANTED, "score": scores[PLANTED]["score"]}}
    assert scores[PLANTED]["score"] > 0.8
    # 0.941 against 0.925 at most elsewhere: the sites of a 2-layer model are much alike
    assert max(v["score"] for site, v in scores.items() if site != PLANTED) < scores[PLANTED]["score"] - 0.01
    assert r["best_site_overall"] == {"site": PLANTED, "mean_score": scores[PLANTED]["score"]}


# ----------------------------------------------------------------------------- score.py itself


def score_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("brainscore_score", REPO / "brainscore" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_py_imports_nothing_of_the_repository():
    tree = ast.parse((REPO / "brainscore" / "score.py").read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "functools", "json", "os", "sys", "pathlib", "brainscore_language",
                        "transformers"}
    assert not imported & (COMMANDS | {"topolm", "model", "positions"})


def test_score_py_best_site_and_pereira_mean():
    summary = score_module().summarise({
        "Pereira2018.243sentences-ridge": {"a": {"score": 0.2}, "b": {"score": 0.6}},
        "Pereira2018.384sentences-ridge": {"a": {"score": 0.4}, "b": {"score": 0.1}},
        "Blank2014-ridge": {"a": {"score": 0.5}, "b": {"score": 0.3}}})
    assert summary["best_site"] == {"Pereira2018": {"site": "b", "score": pytest.approx(0.35)},
                                    "Blank2014-ridge": {"site": "a", "score": 0.5}}
    assert summary["mean_over_benchmarks"] == {"a": pytest.approx(0.4), "b": pytest.approx(0.325)}
    assert summary["best_site_overall"] == {"site": "a", "mean_score": pytest.approx(0.4)}


def test_score_py_refuses_an_unknown_benchmark_before_writing(brainscore_run):
    assert brainscore_run["refusals"] == [
        "benchmarks: NoSuch-ridge cannot be loaded (AssertionError: No registrations found for NoSuch-ridge); its "
        "data come from Brain-Score's S3 bucket (network needed), and the name must be one of brainscore_language's "
        "benchmarks"]
    assert not brainscore_run["refused_written"]


def test_score_py_reads_the_sites_and_refuses_bad_input(exports, tmp_path):
    score = score_module()
    sites = score.read_sites(exports[True][1])
    assert sites["layer.0.attn"] == {"module": "transformer.h.0.ln_2", "io": "input", "index": 0}
    assert list(score.read_sites(exports[False][1], "layer.1.mlp")) == ["layer.1.mlp"]
    with pytest.raises(score.UserError, match="unknown site"):
        score.read_sites(exports[False][1], "layer.9.mlp")
    proc = run_script([PYTHON, "brainscore/score.py", f"model={tmp_path}"], check=False)
    one_error_line(proc, "no topolm.json")
    proc = run_script([PYTHON, "brainscore/score.py", f"model={exports[False][1]}", "benchmark=x"], check=False)
    one_error_line(proc, "'benchmark=x': expected key=value")
    assert list(tmp_path.iterdir()) == []
