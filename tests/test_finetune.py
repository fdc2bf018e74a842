"""finetune.py: metrics against independent values, padding invariance, end-to-end GLUE-format runs."""
import json
import math
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

import finetune
from topolm import glue
from topolm.config import UserError
from topolm.checkpoint import build_classifier
from conftest import (STOP_BOUND_S, StopAtOnce, PYTHON, overrides, read_checkpoint, read_log, run_in_process,
                      run_script, signal_and_wait, start_and_wait_for_log, torchrun, write_pattern_data)
from topolm.glue import average_ranks, compute_metrics, f1_positive, matthews_corr, task_score
from model import GPT, GPTConfig, SequenceClassifier
from positions import gathered_centred_gram, neighborhood_loss, random_layout

# ----------------------------------------------------------------------------- metrics


def test_metrics_golden_values():
    # scikit-learn's and scipy's documented examples
    assert matthews_corr(np.array([1, -1, 1, 1]), np.array([1, 1, 1, -1])) == pytest.approx(-1 / 3)
    assert pearson_of_ranks([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert matthews_corr(np.zeros(5, int), np.array([0, 1, 0, 1, 1])) == 0.0  # constant prediction
    assert f1_positive(np.array([0, 0]), np.array([0, 1])) == 0.0


def pearson_of_ranks(x, y):
    return compute_metrics("stsb", np.array(x, float), np.array(y, float))["spearman"]


def test_metrics_against_independent_formulas():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    # binary MCC is the Pearson correlation of the two 0/1 vectors (phi coefficient)
    assert matthews_corr(pred, gold) == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    # multi-class MCC: Gorodkin's R_K, the covariance of the one-hot matrices
    g3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    p3[:150] = g3[:150]
    Y, P = np.eye(3)[g3], np.eye(3)[p3]
    Y, P = Y - Y.mean(0), P - P.mean(0)
    assert matthews_corr(p3, g3) == pytest.approx((Y * P).sum() / math.sqrt((Y * Y).sum() * (P * P).sum()))
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    m = compute_metrics("mrpc", pred, gold)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 200)
    # Spearman with ties: ranks by counting, then numpy's Pearson
    x, y = rng.integers(0, 6, 80).astype(float), rng.normal(size=80).round(1)
    def ranks(v):
        return np.array([(v < a).sum() + ((v == a).sum() + 1) / 2 for a in v])
    np.testing.assert_allclose(average_ranks(x), ranks(x))
    s = compute_metrics("stsb", x, y)
    assert s["spearman"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    assert s["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert task_score("mnli", {"validation_matched": {"accuracy": 0.6}, "validation_mismatched": {"accuracy": 0.7}}) \
        == pytest.approx(0.65)
    assert task_score("stsb", {"validation": {"pearson": 0.8, "spearman": 0.6}}) == pytest.approx(0.7)


def test_pair_joining_and_truncation():
    eot = glue.EOT_TOKEN
    assert glue.join_pair([1, 2], [3], 10) == ([1, 2, eot, 3], False)
    ids, cut = glue.join_pair(list(range(20)), [100, 101], 9)  # short b is kept whole
    assert ids == [0, 1, 2, 3, 4, 5, eot, 100, 101] and cut
    ids, cut = glue.join_pair(list(range(20)), list(range(100, 120)), 9)  # both long: halves
    assert ids == [0, 1, 2, 3, eot, 100, 101, 102, 103] and len(ids) == 9
    assert glue.join_pair(list(range(5)), None, 3) == ([0, 1, 2], True)


# ----------------------------------------------------------------------------- padding


def tiny_classifier(alpha=1.0, n_outputs=3):
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embed=36, radius=2,
                    neighborhoods_per_batch=3, alpha=alpha)
    torch.manual_seed(0)
    return SequenceClassifier(GPT(cfg, random_layout(4, 36, seed=1)), n_outputs, dropout=0.0).eval()


def test_padding_changes_neither_outputs_nor_spatial_loss():
    model = tiny_classifier()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in (3, 9, 6)]
    padded = torch.randint(0, 100, (3, 9), generator=g)  # arbitrary pad ids
    for row, s in enumerate(seqs):
        padded[row, :len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])
    units = model.gpt.sample_units(torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched, per_site = model(padded, lengths, units=units)
        for row, s in enumerate(seqs):
            alone, _ = model(s[None], torch.tensor([len(s)]), spatial=False)
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-5)
        # the spatial loss sees the real rows only: recompute it from those rows by the plain formula
        acts = model.gpt.site_activations(padded)
        real = torch.arange(9)[None, :] < lengths[:, None]
        k, m = 3, 9
        for site, name in enumerate(model.gpt.site_names):
            rows = acts[name][real]  # (sum of lengths, C)
            cols = rows[:, units[site]].view(-1, k, m).transpose(0, 1)
            expected = neighborhood_loss(cols, model.gpt.sheet.target, model.gpt.sheet.tril_rows,
                                         model.gpt.sheet.tril_cols).mean()
            torch.testing.assert_close(per_site[site], expected, rtol=1e-4, atol=1e-5)
        _, unmasked = model.gpt.encode(padded, units=units)  # no lengths: pad rows count
        assert not torch.allclose(unmasked, per_site, atol=1e-4)  # the pad rows would have counted


def test_masked_centred_gram_gradient_matches_autograd_on_kept_rows():
    torch.manual_seed(0)
    act = torch.randn(12, 20, dtype=torch.float64, requires_grad=True)
    units = torch.tensor([3, 7, 1, 0, 19, 7, 2, 11, 5, 3])  # 2 groups of 5, sharing units 3 and 7
    keep = torch.tensor([1.0] * 7 + [0.0] * 5, dtype=torch.float64)
    weights = torch.randn(2, 5, 5, dtype=torch.float64)
    (gathered_centred_gram(act, units, 2, keep[:, None]) * weights).sum().backward()
    ours = act.grad.clone()
    act.grad = None
    kept = act[:7, units].view(7, 2, 5).transpose(0, 1)
    xc = kept - kept.mean(dim=1, keepdim=True)
    (xc.transpose(1, 2) @ xc * weights).sum().backward()
    torch.testing.assert_close(ours, act.grad)
    assert ours[7:].abs().max() == 0


# ----------------------------------------------------------------------------- end to end

FILL = "the a cat dog river stone walks sees near under old young house tree".split()
POS, NEG = "good great happy fine".split(), "bad awful sad poor".split()


def sentiment_rows(n, rng):
    """Label 1 iff the sentence holds a positive word, anywhere among random filler words."""
    rows = []
    for i in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILL, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POS if label else NEG)))
        rows.append({"sentence": " ".join(words), "label": label, "idx": i})
    return rows


def pair_rows(n, rng, regression=False):
    rows = []
    for i in range(n):
        a, b = " ".join(rng.choice(FILL, size=4)), " ".join(rng.choice(FILL, size=5))
        label = float(rng.uniform(0, 5)) if regression else int(rng.integers(3))
        rows.append({"premise": a, "hypothesis": b, "sentence1": a, "sentence2": b, "label": label, "idx": i})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def pretrained(gpt2_run):
    """The session's tiny checkpoint (conftest.gpt2_run), with GPT-2's vocabulary so that real text fits;
    finetuning reads it and writes into its own folder."""
    return gpt2_run.run


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    write_jsonl(root / "sst2" / "train.jsonl", sentiment_rows(512, rng))
    write_jsonl(root / "sst2" / "validation.jsonl", sentiment_rows(100, rng))
    (root / "mnli").mkdir()
    pd.DataFrame(pair_rows(64, rng)).to_parquet(root / "mnli" / "train.parquet")
    pd.DataFrame(pair_rows(21, rng)).to_parquet(root / "mnli" / "validation_matched.parquet")
    pd.DataFrame(pair_rows(17, rng)).to_parquet(root / "mnli" / "validation_mismatched.parquet")
    (root / "stsb").mkdir()
    for split, n in (("train", 64), ("validation", 30)):
        pd.DataFrame(pair_rows(n, rng, regression=True))[["sentence1", "sentence2", "label", "idx"]].to_csv(
            root / "stsb" / f"{split}.tsv", sep="\t", index=False)
    return root


def finetune_args(ckpt, glue, out, **kw):
    base = dict(ckpt=ckpt, data_dir=glue, out_dir=out, max_length=16, batch_size=16, learning_rate=3e-3,
                device="cpu", dtype="float32", log_interval=10)
    return ["finetune_glue.yaml", *[f"{k}={v}" for k, v in {**base, **kw}.items()]]


def read_predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sentiment_task_learns_stops_early_and_reports_right_metrics(pretrained, glue_dir, tmp_path):
    finetune.main(finetune_args(pretrained, glue_dir, tmp_path, task="sst2", max_epochs=40, patience=2))
    task_dir = tmp_path / "sst2"
    metrics = json.loads((task_dir / "metrics.json").read_text())
    assert metrics["stop_reason"] == "early stopping"
    assert metrics["splits"]["validation"]["accuracy"] > 0.85  # chance is 0.5
    log = read_log(task_dir)
    evals = [r for r in log if r["event"] == "eval"]
    losses = [e["splits"]["validation"]["loss"] for e in evals]
    best = int(np.argmin(losses))
    assert metrics["best_iter"] == evals[best]["iter"] and len(evals) - 1 - best == 2  # patience 2
    assert evals[-1]["splits"]["validation"]["spatial"] > 0  # the spatial loss stayed on

    # the metrics are those of the saved predictions, and the saved model makes those predictions
    preds = read_predictions(task_dir / "predictions-validation.jsonl")
    gold = [json.loads(x)["label"] for x in (glue_dir / "sst2" / "validation.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == gold
    assert metrics["splits"]["validation"]["accuracy"] == pytest.approx(
        np.mean([p["prediction"] == g for p, g in zip(preds, gold)]))
    ckpt = read_checkpoint(task_dir / "ckpt-best.pt")
    assert ckpt["iter_num"] == metrics["best_iter"] and ckpt["task"]["name"] == "sst2"
    model = build_classifier(ckpt)
    val = glue.tokenize(glue.load_glue("sst2", str(glue_dir))["validation"], "sst2", 16)
    idx, lengths, _ = finetune.collate(val, np.arange(len(val)), "cpu")
    with torch.no_grad():
        outputs, _ = model.eval()(idx, lengths, spatial=False)
    assert outputs.argmax(-1).tolist() == [p["prediction"] for p in preds]

    proc = run_in_process([PYTHON, "glue_summary.py", f"dir={tmp_path}"])
    row = [line for line in proc.stdout.splitlines() if line.startswith("sst2")][0]
    assert f"{metrics['score']:.4f}" in row and "early stopping" in row

    # a second finetuning into the same folder is refused; nothing is touched
    before = (task_dir / "metrics.json").read_bytes()
    with pytest.raises(UserError, match="already holds ckpt-best.pt, metrics.json; pass overwrite=true"):
        finetune.main(finetune_args(pretrained, glue_dir, tmp_path, task="sst2"))
    assert (task_dir / "metrics.json").read_bytes() == before


def test_mnli_two_validation_splits_and_stsb_regression_from_tsv(pretrained, glue_dir, tmp_path):
    finetune.main(finetune_args(pretrained, glue_dir, tmp_path, task="mnli", max_iters=4, eval_interval=2,
                                alpha_scale=0.0))
    m = json.loads((tmp_path / "mnli" / "metrics.json").read_text())
    assert set(m["splits"]) == {"validation_matched", "validation_mismatched"}
    assert m["splits"]["validation_matched"]["n"] == 21 and m["splits"]["validation_mismatched"]["n"] == 17
    assert m["score"] == pytest.approx((m["splits"]["validation_matched"]["accuracy"]
                                        + m["splits"]["validation_mismatched"]["accuracy"]) / 2)
    assert m["splits"]["validation_matched"]["spatial"] == 0.0  # alpha_scale=0 turns it off
    for split in ("validation_matched", "validation_mismatched"):
        preds = read_predictions(tmp_path / "mnli" / f"predictions-{split}.jsonl")
        acc = np.mean([p["prediction"] == p["label"] for p in preds])
        assert m["splits"][split]["accuracy"] == pytest.approx(acc)

    finetune.main(finetune_args(pretrained, glue_dir, tmp_path, task="stsb", max_iters=4, eval_interval=2))
    s = json.loads((tmp_path / "stsb" / "metrics.json").read_text())
    preds = read_predictions(tmp_path / "stsb" / "predictions-validation.jsonl")
    x, y = np.array([p["prediction"] for p in preds]), np.array([p["label"] for p in preds])
    assert len(preds) == 30 and s["splits"]["validation"]["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert s["score"] == pytest.approx((s["splits"]["validation"]["pearson"] + s["splits"]["validation"]["spearman"]) / 2)

    proc = run_in_process([PYTHON, "glue_summary.py", f"dir={tmp_path}"])
    assert [line.split()[0] for line in proc.stdout.splitlines()[2:]] == ["stsb", "mnli", "avg"]
    assert f"{(m['score'] + s['score']) / 2:.4f}" in proc.stdout.splitlines()[-1]


@pytest.mark.torchrun
def test_ddp_two_ranks_evaluate_the_whole_validation_set(pretrained, glue_dir, tmp_path):
    run_script(torchrun(2, "finetune.py", finetune_args(pretrained, glue_dir, tmp_path, task="sst2", max_iters=6,
                                                         eval_interval=3, batch_size=8, gradient_accumulation_steps=2,
                                                         backend="gloo")))
    log = read_log(tmp_path / "sst2")
    assert log[0]["world_size"] == 2
    end = [r for r in log if r["event"] == "end"][0]
    assert len(end["param_sha256"]) == 2 and len(set(end["param_sha256"])) == 1
    preds = read_predictions(tmp_path / "sst2" / "predictions-validation.jsonl")
    assert [p["index"] for p in preds] == list(range(100))


@pytest.mark.parametrize("kw,match", [
    (dict(task="glue"), "task must be one of cola, sst2"),
    (dict(task="rte"), "data folder not found: .*rte"),
    (dict(task="sst2", max_length=65), "max_length=65 exceeds the checkpoint's block_size=64"),
    (dict(task="sst2", batch_size=600), "the training set has 512 examples; one optimizer step needs 600"),
    (dict(ckpt="nowhere"), "checkpoint not found: nowhere"),
])
def test_bad_finetune_inputs(pretrained, glue_dir, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        finetune.main(finetune_args(kw.pop("ckpt", pretrained), glue_dir, tmp_path, **kw))
    assert not (tmp_path / "sst2").exists()


def test_bad_finetune_data(pretrained, tmp_path):
    glue = tmp_path / "glue"
    write_jsonl(glue / "cola" / "train.jsonl", [{"text": "no sentence column", "label": 0}])
    write_jsonl(glue / "cola" / "validation.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(UserError, match=r"cola/? train: missing column\(s\) sentence for cola \(has text, label\)"):
        finetune.main(finetune_args(pretrained, glue, tmp_path, task="cola"))
    write_jsonl(glue / "rte" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "entailment"}])
    write_jsonl(glue / "rte" / "validation.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0}])
    with pytest.raises(UserError, match="labels must be numbers as in nyu-mll/glue"):
        finetune.main(finetune_args(pretrained, glue, tmp_path, task="rte"))
    write_jsonl(glue / "wnli" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 5}])
    write_jsonl(glue / "wnli" / "validation.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0}])
    with pytest.raises(UserError, match=r"label 5 is not a class of wnli \(0..1"):
        finetune.main(finetune_args(pretrained, glue, tmp_path, task="wnli"))
    (glue / "qnli").mkdir()
    with pytest.raises(UserError, match="no train file in .*qnli"):
        finetune.main(finetune_args(pretrained, glue, tmp_path, task="qnli"))


def test_checkpoint_without_gpt2_vocabulary_is_refused(tmp_path, glue_dir):
    data = write_pattern_data(tmp_path / "data")
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="small", max_iters=1)])
    proc = run_in_process([PYTHON, "finetune.py", *finetune_args(tmp_path / "small", glue_dir, tmp_path, task="sst2")],
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("has vocab_size=64; GLUE text needs the GPT-2 vocabulary (at least 50257)")


def test_sigterm_then_resume_matches_an_uninterrupted_run(pretrained, glue_dir, tmp_path):
    common = dict(task="sst2", max_iters=60, eval_interval=6, patience=100, log_interval=1, max_train_examples=200)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_in_process([PYTHON, "finetune.py", *finetune_args(pretrained, glue_dir, whole, **common)])
    proc = start_and_wait_for_log([PYTHON, "finetune.py", *finetune_args(pretrained, glue_dir, cut, **common)],
                                  cut / "sst2" / "log.jsonl", '"iter": 5,')
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = [r for r in read_log(cut / "sst2") if r["event"] == "stopped"]
    assert len(stopped) == 1 and 5 < stopped[0]["iter"] < 60
    assert (cut / "sst2" / "ckpt-last.pt").is_file() and not (cut / "sst2" / "metrics.json").exists()
    refused = run_in_process([PYTHON, "finetune.py", *finetune_args(pretrained, glue_dir, cut, **common)], check=False)
    assert refused.returncode == 2 and "pass init_from=resume to continue it" in refused.stderr
    run_in_process([PYTHON, "finetune.py", *finetune_args(pretrained, glue_dir, cut, init_from="resume", **common)])
    assert not (cut / "sst2" / "ckpt-last.pt").exists()  # a finished run leaves nothing to resume

    def train_losses(folder):
        return {r["iter"]: (r["task"], r["spatial"]) for r in read_log(folder / "sst2") if r["event"] == "train"}
    assert train_losses(whole) == train_losses(cut) and len(train_losses(cut)) == 60
    a = json.loads((whole / "sst2" / "metrics.json").read_text())
    b = json.loads((cut / "sst2" / "metrics.json").read_text())
    assert a["splits"] == b["splits"] and a["best_iter"] == b["best_iter"]
    wa = read_checkpoint(whole / "sst2" / "ckpt-best.pt")
    wb = read_checkpoint(cut / "sst2" / "ckpt-best.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert all(torch.equal(wa["head"][k], wb["head"][k]) for k in wa["head"])


def test_a_stop_during_the_evaluation_abandons_it_and_the_resumed_run_does_it_first(pretrained, glue_dir, tmp_path):
    """SIGTERM while the last evaluation runs (500 validation batches): the run leaves it within seconds,
    logs no partial evaluation, writes no metrics and saves ckpt-last.pt at the last step with the
    evaluation pending; resumed, it evaluates first and ends with an uninterrupted run's results."""
    glue = tmp_path / "glue"
    (glue / "sst2").mkdir(parents=True)
    shutil.copy(glue_dir / "sst2" / "train.jsonl", glue / "sst2")
    write_jsonl(glue / "sst2" / "validation.jsonl", sentiment_rows(2000, np.random.default_rng(1)))
    common = dict(task="sst2", max_iters=2, eval_interval=2, batch_size=4, log_interval=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_in_process([PYTHON, "finetune.py", *finetune_args(pretrained, glue, whole, **common)])
    proc = start_and_wait_for_log([PYTHON, "finetune.py", *finetune_args(pretrained, glue, cut, **common)],
                                  cut / "sst2" / "log.jsonl", '"iter": 1,')
    seconds, out, err = signal_and_wait(proc, signal.SIGTERM)
    assert proc.returncode == 0 and seconds < STOP_BOUND_S, (proc.returncode, seconds, err[-2000:])
    assert "stop requested during the evaluation at step 2: evaluation abandoned" in out
    assert [(r["event"], r["iter"]) for r in read_log(cut / "sst2")] == [("start", 0), ("train", 0), ("train", 1),
                                                                          ("stopped", 2)]
    assert read_checkpoint(cut / "sst2" / "ckpt-last.pt")["eval_pending"] is True
    assert not (cut / "sst2" / "metrics.json").exists() and not (cut / "sst2" / "ckpt-best.pt").exists()

    run_in_process([PYTHON, "finetune.py", *finetune_args(pretrained, glue, cut, init_from="resume", **common)])
    log = read_log(cut / "sst2")
    assert [(r["event"], r["iter"]) for r in log[4:]] == [("resume", 2), ("eval", 2), ("end", 2)]
    a = json.loads((whole / "sst2" / "metrics.json").read_text())
    b = json.loads((cut / "sst2" / "metrics.json").read_text())
    assert a["splits"] == b["splits"] and a["best_iter"] == b["best_iter"] == 2
    wa, wb = read_checkpoint(whole / "sst2" / "ckpt-best.pt"), read_checkpoint(cut / "sst2" / "ckpt-best.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_classifier_with_padding_mask_compiles_in_one_graph():
    import torch._dynamo
    model = tiny_classifier()
    idx, lengths = torch.randint(0, 100, (3, 10)), torch.tensor([4, 10, 7])
    units = model.gpt.sample_units(torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, n, u: model(a, n, units=u))(idx, lengths, units)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.compile
def test_compiled_finetuning_matches_eager(pretrained, glue_dir, tmp_path):
    """finetune.py with compile=True vs False (padded batches of varying length, so dynamo also
    recompiles with a dynamic sequence length): every logged loss within 1e-4 relative. Dropout is
    off: inductor draws its own dropout masks, so with dropout the two runs agree in distribution only."""
    common = dict(task="sst2", max_iters=4, eval_interval=2, log_interval=1, max_train_examples=128, dropout=0.0)
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"c{int(flag)}"
        run_script([PYTHON, "finetune.py", *finetune_args(pretrained, glue_dir, out, compile=flag, **common)],
                   timeout=600)
        log = read_log(out / "sst2")
        losses[flag] = {(r["iter"], key): r[key] for r in log if r["event"] == "train" for key in ("task", "spatial")}
        losses[flag].update({(r["iter"], split, key): m[key] for r in log if r["event"] == "eval"
                             for split, m in r["splits"].items() for key in ("loss", "spatial")})
    assert len(losses[True]) == 4 * 2 + 2 * 2 and losses[False].keys() == losses[True].keys()
    assert all(losses[True][(it, "spatial")] > 0 for it in range(4))  # the spatial loss is on
    bad = {k: (losses[False][k], losses[True][k]) for k in losses[False]
           if abs(losses[False][k] - losses[True][k]) > 1e-4 * abs(losses[False][k])}
    assert not bad, bad


def test_a_stopped_finetuning_prints_its_resume_command_and_the_resume_says_where(pretrained, glue_dir, tmp_path,
                                                                                   monkeypatch):
    import shlex
    from conftest import run_main

    args = finetune_args(pretrained, glue_dir, tmp_path, task="sst2", max_iters=3, max_train_examples=64,
                         overwrite="true")
    monkeypatch.setattr(finetune, "StopFlag", StopAtOnce)
    ran = run_main(finetune, args)
    assert ran.returncode == 0, ran.stderr
    (line,) = [s for s in ran.stdout.splitlines() if s.startswith("stop requested")]
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "python" and command[1].endswith("finetune.py") and command[2] == "finetune_glue.yaml"
    assert command[-4:] == [f"out_dir={tmp_path}", "task=sst2", "overwrite=false", "init_from=resume"]
    monkeypatch.undo()
    resumed = run_main(finetune, command[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from iteration 1 ({tmp_path / 'sst2' / 'ckpt-last.pt'})" in resumed.stdout.splitlines()
    assert (tmp_path / "sst2" / "metrics.json").is_file()


@pytest.mark.parametrize("row,message", [
    ({"sentence": "fine \ud83d", "label": 0}, "train.jsonl line 2: 'sentence' holds the escape \\ud83d"),
    ({"sentence": None, "label": 0}, "train.jsonl line 2: 'sentence' is null, not a string"),
], ids=["surrogate", "null"])
def test_glue_jsonl_rows_are_refused_naming_file_line_and_field(pretrained, tmp_path, row, message):
    from conftest import one_error_line, run_main

    glue = tmp_path / "glue"
    write_jsonl(glue / "cola" / "train.jsonl", [{"sentence": "a good one", "label": 1}, row])
    write_jsonl(glue / "cola" / "validation.jsonl", [{"sentence": "x", "label": 0}])
    one_error_line(run_main(finetune, finetune_args(pretrained, glue, tmp_path / "ft", task="cola")), message)
    assert not (tmp_path / "ft").exists()


def test_glue_keeps_empty_text_as_qqp_has_it(pretrained, tmp_path):
    """QQP's train split holds two empty question2 (on the Hub too): empty GLUE text is text, not an error."""
    folder = tmp_path / "glue"
    rows = [{"question1": "How can I develop android app?", "question2": "", "label": 0},
            {"question1": "a", "question2": "b", "label": 1}]
    write_jsonl(folder / "qqp" / "train.jsonl", rows)
    write_jsonl(folder / "qqp" / "validation.jsonl", rows)
    assert glue.load_glue("qqp", str(folder))["train"]["question2"] == ["", "b"]
