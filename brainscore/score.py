"""Brain-Score language on an exported TopoLM folder: every site scored alone, the best site per benchmark.

    make .venv-brainscore/.installed          # its own environment: brainscore/requirements.txt
    .venv-brainscore/bin/python brainscore/score.py model=hf/<run>
    .venv-brainscore/bin/python brainscore/score.py model=hf/<run> benchmarks=Pereira2018.243sentences-ridge sites=layer.5.mlp

`model` is a folder written by export_hf.py (a transformers GPT2LMHeadModel with the tokenizer files,
`positions.npy` and `topolm.json`). Each site of topolm.json's `site_modules` becomes one
`brainscore_language` `HuggingfaceSubject` whose `region_layer_mapping` holds that site's module only,
and is scored on each benchmark; per benchmark the best site is the one with the highest
ceiling-normalised score. The neural data and ceilings are downloaded from Brain-Score's S3 bucket
when a benchmark is loaded (network needed).

This file imports nothing of the TopoLM repository: brainscore-language 2.3.0 needs numpy < 2 and
transformers < 5, so it runs in an environment of its own, and it reads topolm.json itself.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

# brainscore_core's plugin loader runs `pip install -r <plugin>/requirements.txt` (unpinned, with
# whatever `pip` is first on PATH) unless told not to; everything needed is pinned in requirements.txt.
os.environ["BS_INSTALL_DEPENDENCIES"] = "no"

# The four benchmarks of the TopoLM paper's Brain-Score table, as brainscore_language 2.3.0 names them
# (ridge regression, Pearson r, ceiling-normalised; Tuckute2024 has no ceiling). Pereira2018 is two
# experiments; Brain-Score's Pereira2018 score is their mean, reported as "Pereira2018".
PAPER_BENCHMARKS = ("Pereira2018.243sentences-ridge", "Pereira2018.384sentences-ridge", "Blank2014-ridge",
                    "Fedorenko2016-ridge", "Tuckute2024-ridge")
PEREIRA_PARTS = ("Pereira2018.243sentences-ridge", "Pereira2018.384sentences-ridge")
KEYS = {
    "model": "the exported folder (export_hf.py's out=)",
    "benchmarks": "'paper' (the paper's four: Pereira2018's two experiments, Blank2014, Fedorenko2016, "
                  "Tuckute2024, all -ridge) or brainscore_language benchmark identifiers, comma-separated",
    "sites": "'all' or site names of topolm.json, comma-separated (layer.<i>.attn, layer.<i>.mlp)",
    "out": "the JSON file written (default: <model>.brainscore.json beside the folder)",
}


class UserError(Exception):
    """Bad input: printed as one `error:` line, exit status 2, nothing written."""


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments as a dict of KEYS. Raises UserError for an unknown key or a missing model."""
    args = {"benchmarks": "paper", "sites": "all", "out": ""}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise UserError(f"{arg!r}: expected key=value with key one of {', '.join(KEYS)} (`help` lists them)")
        args[key] = value
    if not args.get("model"):
        raise UserError("model=<exported folder> is required")
    return args


def read_sites(folder: Path, wanted: str = "all") -> dict[str, dict]:
    """Site name -> `{"module", "io", "index"}` from `folder`/topolm.json, in the file's order; only the
    `wanted` sites ('all' or comma-separated names). Raises UserError when the folder is no export with
    a tokenizer, or names an unknown site."""
    meta_path = folder / "topolm.json"
    if not meta_path.is_file():
        raise UserError(f"{folder}: no topolm.json; model= must be a folder written by export_hf.py")
    meta = json.loads(meta_path.read_text())
    sites = meta.get("site_modules")
    if not isinstance(sites, dict) or not sites:
        raise UserError(f"{meta_path} has no site_modules (an export of an older version); export the model again")
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer files (a model of token ids only); Brain-Score reads text")
    if wanted == "all":
        return dict(sites)
    names = [s.strip() for s in wanted.split(",") if s.strip()]
    unknown = [s for s in names if s not in sites]
    if unknown or not names:
        raise UserError(f"sites={wanted}: unknown site(s) {', '.join(unknown) or '(none given)'}; "
                        f"the folder has {', '.join(sites)}")
    return {name: sites[name] for name in names}


def benchmark_ids(arg: str) -> list[str]:
    ids = list(PAPER_BENCHMARKS) if arg == "paper" else [b.strip() for b in arg.split(",") if b.strip()]
    if not ids:
        raise UserError(f"benchmarks={arg!r} names no benchmark")
    return ids


def site_tensor(values, spec: dict):
    """The site's (batch, tokens, units) tensor from a hook's output or a pre-hook's positional inputs.
    `index` null means the tensor itself; transformers 4's blocks return a 1-tuple there instead of
    transformers 5's tensor, so a tuple with a null index gives its element 0."""
    if isinstance(values, (tuple, list)):
        return values[spec["index"] or 0]
    return values


@functools.cache
def make_subject_class():
    """`SiteSubject`: a HuggingfaceSubject that records each layer name at its topolm.json site: a forward
    hook for `io: output` (what HuggingfaceSubject does), a forward pre-hook for `io: input` (the
    with_resid=true attention site, the input of ln_2, which HuggingfaceSubject's output hooks cannot
    reach). Built on first use, so that this module imports without brainscore_language."""
    from brainscore_language.model_helpers.huggingface import HuggingfaceSubject

    class SiteSubject(HuggingfaceSubject):
        def __init__(self, model_id: str, site_specs: dict[str, dict], **kwargs):
            """`site_specs`: module name -> topolm.json spec; the region_layer_mapping's layer names."""
            self.site_specs = site_specs
            super().__init__(model_id, **kwargs)

        def _register_hook(self, layer, key, target_dict):
            spec = self.site_specs[key[2]]  # key = (recording target, recording type, layer name)

            def store(values, key=key):
                target_dict[key] = site_tensor(values, spec)
            if spec["io"] == "input":
                return layer.register_forward_pre_hook(lambda module, args: store(args))
            return layer.register_forward_hook(lambda module, args, output: store(output))
    return SiteSubject


def load_folder(folder: Path):
    """The folder's GPT2LMHeadModel (eval mode, float32) and its tokenizer, truncating on the left as
    HuggingfaceSubject's own tokenizer does (a context longer than the model's block keeps its last tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, truncation_side="left")
    return model, tokenizer


def site_subject(folder: Path, site: str, spec: dict, model, tokenizer):
    """A fresh subject recording `site` only (a benchmark appends its recording to the subject it is given)."""
    from brainscore_language import ArtificialSubject

    mapping = {ArtificialSubject.RecordingTarget.language_system: [spec["module"]]}
    return make_subject_class()(f"{folder.name}:{site}", {spec["module"]: spec}, region_layer_mapping=mapping,
                                model=model, tokenizer=tokenizer)


def score_value(score) -> dict:
    """A Brain-Score Score as {score (ceiling-normalised where the benchmark has a ceiling), raw}."""
    raw = score.attrs.get("raw")
    return {"score": float(score), "raw": None if raw is None else float(raw)}


def summarise(scores: dict[str, dict[str, dict]]) -> dict:
    """Per benchmark the best site and its score; Pereira2018's two experiments averaged per site first
    (as Brain-Score's Pereira2018 score is), and the site with the highest mean over the benchmarks."""
    per_benchmark = {b: {s: v["score"] for s, v in by_site.items()} for b, by_site in scores.items()}
    if all(p in per_benchmark for p in PEREIRA_PARTS):
        sites = per_benchmark[PEREIRA_PARTS[0]]
        per_benchmark["Pereira2018"] = {s: (per_benchmark[PEREIRA_PARTS[0]][s] + per_benchmark[PEREIRA_PARTS[1]][s]) / 2
                                        for s in sites}
        for p in PEREIRA_PARTS:
            del per_benchmark[p]
    best = {b: max(by_site.items(), key=lambda kv: kv[1]) for b, by_site in per_benchmark.items()}
    sites = list(next(iter(per_benchmark.values())))
    means = {s: sum(by_site[s] for by_site in per_benchmark.values()) / len(per_benchmark) for s in sites}
    overall = max(means.items(), key=lambda kv: kv[1])
    return {"best_site": {b: {"site": s, "score": v} for b, (s, v) in best.items()},
            "mean_over_benchmarks": means, "best_site_overall": {"site": overall[0], "mean_score": overall[1]}}


def load(benchmark_id: str):
    """brainscore_language's benchmark `benchmark_id`, its data and ceiling downloaded from Brain-Score's S3
    bucket. Raises UserError naming the benchmark when it is unknown or cannot be downloaded."""
    import brainscore_language

    try:
        return brainscore_language.load_benchmark(benchmark_id)
    except Exception as e:  # the package raises bare Exceptions (a list of boto errors), AssertionErrors, KeyErrors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"benchmarks: {benchmark_id} cannot be loaded ({type(e).__name__}: {reason[:300]}); "
                        f"its data come from Brain-Score's S3 bucket (network needed), and the name must be one "
                        f"of brainscore_language's benchmarks") from e


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("help", "--help", "-h"):
        print(__doc__)
        for key, text in KEYS.items():
            print(f"  {key}: {text}")
        return
    args = parse_args(argv)
    folder = Path(args["model"])
    sites = read_sites(folder, args["sites"])
    ids = benchmark_ids(args["benchmarks"])
    out = Path(args["out"]) if args["out"] else folder.with_name(folder.name + ".brainscore.json")
    if not out.parent.is_dir():
        raise UserError(f"out={out}: the folder {out.parent} does not exist")
    benchmarks = {benchmark_id: load(benchmark_id) for benchmark_id in ids}  # every download before any scoring
    model, tokenizer = load_folder(folder)
    scores = {}
    for benchmark_id, benchmark in benchmarks.items():
        scores[benchmark_id] = {}
        for site, spec in sites.items():
            scores[benchmark_id][site] = score_value(benchmark(site_subject(folder, site, spec, model, tokenizer)))
            print(f"{benchmark_id:34s} {site:14s} {scores[benchmark_id][site]['score']:.4f}", flush=True)
    result = {"model": str(folder), "benchmarks": ids, "sites": sites, "scores": scores, **summarise(scores),
              "topolm": {k: json.loads((folder / "topolm.json").read_text()).get(k) for k in ("provenance", "data")}}
    write_json(out, result)
    for b, best in result["best_site"].items():
        print(f"best site on {b}: {best['site']} ({best['score']:.4f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
