"""Run by tests/test_brainscore.py with the Brain-Score environment's python (.venv-brainscore): what
brainscore_language makes of an exported folder, written to a file for the test to compare.

    python tests/brainscore_wiring.py <jobs.json>

"digest" jobs (folder, stimuli, out .npz): per site of topolm.json, each sentence digested alone and
the passage digested as one text (one presentation per part) through brainscore/score.py's subject;
the token ids and logits of the last sentence;
the same sentences through a plain HuggingfaceSubject at the site's module; the contexts Brain-Score
built. "ridge" jobs (folder, site, stimuli, out .json): Brain-Score's ridge_pearsonr metric on the
site's activations of the stimuli against a noisy linear map of them, and against the same map with
the stimuli shuffled. "score" jobs (folder, site, stimuli, out .json): brainscore/score.py's main with
Brain-Score's Blank2014 benchmark on synthetic stories whose neural data are a noisy linear map of
one site. "refused" (argument lists of score.py): the messages of its refusals, to "refusals".
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "brainscore"))
import score  # noqa: E402  (brainscore/score.py; sets BS_INSTALL_DEPENDENCIES=no on import)

from brainscore_language import ArtificialSubject, load_metric  # noqa: E402
from brainscore_language.model_helpers.huggingface import HuggingfaceSubject  # noqa: E402
from brainscore_core.supported_data_standards.brainio.assemblies import NeuroidAssembly  # noqa: E402

TARGET, FMRI = ArtificialSubject.RecordingTarget.language_system, ArtificialSubject.RecordingType.fMRI


def recording(subject):
    subject.start_neural_recording(recording_target=TARGET, recording_type=FMRI)
    return subject


def digest(folder: Path, stimuli: dict, out: Path) -> None:
    import torch

    model, tokenizer = score.load_folder(folder)
    ids = tokenizer(stimuli["sentences"][-1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        arrays = {"ids": ids.numpy(), "logits": model(ids).logits.numpy()}  # the folder as transformers 4 reads it
    for site, spec in score.read_sites(folder).items():
        subject = recording(score.site_subject(folder, site, spec, model, tokenizer))
        arrays[f"{site}/alone"] = np.stack([subject.digest_text(s)["neural"].values[0] for s in stimuli["sentences"]])
        passage = subject.digest_text(stimuli["passage"])["neural"]
        arrays[f"{site}/passage"] = passage.values
        arrays[f"{site}/layer"] = np.unique(passage["layer"].values).astype(str)
        plain = recording(HuggingfaceSubject(f"{folder.name}:plain", model=model, tokenizer=tokenizer,
                                             region_layer_mapping={TARGET: [spec["module"]]}))
        arrays[f"{site}/plain"] = np.stack([plain.digest_text(s)["neural"].values[0] for s in stimuli["sentences"]])
        arrays["contexts"] = passage["context"].values.astype(str)
    np.savez(out, **arrays)


def ridge(folder: Path, site: str, stimuli: dict, out: Path) -> None:
    model, tokenizer = score.load_folder(folder)
    subject = recording(score.site_subject(folder, site, score.read_sites(folder)[site], model, tokenizer))
    sentences = stimuli["sentences"]
    x = np.stack([subject.digest_text(s)["neural"].values[0] for s in sentences])
    ids = [f"s{i:03d}" for i in range(len(sentences))]
    source = NeuroidAssembly(x, coords={"stimulus_id": ("presentation", ids), "stimulus": ("presentation", sentences),
                                        "neuroid_id": ("neuroid", [f"u{u}" for u in range(x.shape[1])]),
                                        "layer": ("neuroid", [site] * x.shape[1])},
                             dims=["presentation", "neuroid"])
    rng = np.random.default_rng(stimuli["seed"])
    signal = (x - x.mean(0)) @ rng.normal(size=(x.shape[1], stimuli["neuroids"]))
    y = signal + stimuli["noise"] * signal.std(0) * rng.normal(size=signal.shape)
    results = {}
    for name, order in (("linear", np.arange(len(ids))), ("shuffled", rng.permutation(len(ids)))):
        # two coordinates per dimension: a dimension with one coordinate is not kept as a MultiIndex
        target = NeuroidAssembly(y, coords={"stimulus_id": ("presentation", [ids[i] for i in order]),
                                            "stimulus": ("presentation", [sentences[i] for i in order]),
                                            "neuroid_id": ("neuroid", [f"n{n}" for n in range(y.shape[1])]),
                                            "subject": ("neuroid", ["synthetic"] * y.shape[1])},
                                 dims=["presentation", "neuroid"])
        metric = load_metric("ridge_pearsonr")  # Brain-Score's defaults: 10 splits of 90% train, by stimulus_id
        result = metric(source, target)
        results[name] = {"score": float(result), "splits": int(result.raw.sizes["split"])}
    results["n_stimuli"], results["n_units"] = len(ids), int(x.shape[1])
    out.write_text(json.dumps(results))


def synthetic_blank2014(data, ceiling: float):
    """Brain-Score's Blank2014 benchmark (its own __call__: each story digested in order, ridge regression
    cross-validated by story in 8 group folds, ceiling-normalised) on `data` instead of the S3 recordings."""
    from brainscore_core.benchmarks import BenchmarkBase
    from brainscore_core.metrics import Score
    from brainscore_language.benchmarks.blank2014.benchmark import Blank2014

    benchmark = Blank2014.__new__(Blank2014)
    benchmark.data = data
    benchmark.metric = load_metric("ridge_pearsonr", crossvalidation_kwargs=dict(splits=8, split_coord="story",
                                                                                 kfold="group", random_state=1234))
    BenchmarkBase.__init__(benchmark, identifier="synthetic-Blank2014-ridge", ceiling=Score(ceiling), version=1,
                           parent="synthetic")
    return benchmark


def score_run(folder: Path, site: str, stimuli: dict, out: Path) -> None:
    """score.py's main on the folder with one benchmark, Blank2014's on synthetic stories whose neural
    assembly is a noisy linear map of `site` as Brain-Score records it there."""
    import brainscore_language

    model, tokenizer = score.load_folder(folder)
    subject = recording(score.site_subject(folder, site, score.read_sites(folder)[site], model, tokenizer))
    stories = stimuli["stories"]
    x = np.concatenate([subject.digest_text(story)["neural"].values for story in stories])
    rng = np.random.default_rng(stimuli["seed"])
    signal = (x - x.mean(0)) @ rng.normal(size=(x.shape[1], stimuli["neuroids"]))
    y = signal + stimuli["noise"] * signal.std(0) * rng.normal(size=signal.shape)
    data = NeuroidAssembly(y, coords={
        "stimulus_id": ("presentation", [f"s{i:03d}" for i in range(len(y))]),
        "stimulus": ("presentation", [sentence for story in stories for sentence in story]),
        "story": ("presentation", [f"story{k:02d}" for k, story in enumerate(stories) for _ in story]),
        "neuroid_id": ("neuroid", [f"n{n}" for n in range(y.shape[1])]),
        "subject": ("neuroid", ["synthetic"] * y.shape[1])}, dims=["presentation", "neuroid"])
    benchmark = synthetic_blank2014(data, stimuli["ceiling"])
    original = brainscore_language.load_benchmark
    brainscore_language.load_benchmark = lambda identifier: benchmark  # what score.load calls, by name
    try:
        score.main([f"model={folder}", "benchmarks=synthetic-Blank2014-ridge", f"out={out}"])
    finally:
        brainscore_language.load_benchmark = original


if __name__ == "__main__":
    # one process for every job (importing brainscore_language takes most of its time)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs["digest"]:
        digest(Path(job["folder"]), job["stimuli"], Path(job["out"]))
    for job in jobs["ridge"]:
        ridge(Path(job["folder"]), job["site"], job["stimuli"], Path(job["out"]))
    for job in jobs.get("score", []):
        score_run(Path(job["folder"]), job["site"], job["stimuli"], Path(job["out"]))
    refusals = []
    for argv in jobs.get("refused", []):  # score.py's main given bad input: the UserError's message
        try:
            score.main(argv)
            refusals.append(None)
        except score.UserError as e:
            refusals.append(str(e))
    if "refusals" in jobs:
        Path(jobs["refusals"]).write_text(json.dumps(refusals))
