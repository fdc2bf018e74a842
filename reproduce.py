"""The paper's table for a topographic model and its control, from one command (Rathi et al. 2025's Table 1 and
figures 2-4).

    python reproduce.py ckpt=out/<run> control=out/<control>
    python reproduce.py ckpt=out/<run> control=out/<control> blimp=path/to/blimp/data glue=finetuned/<run>

Runs, on both models: the analysis of analyze.py (topolm.analysis_run: maps, Moran's I, the readout at
`fwhm`, the clusters of the localizer map and their held-out profiles); BLiMP (`blimp`: a folder of
<paradigm>.jsonl files, or `hub` for nyu-mll/blimp; empty: skipped); the validation task loss and the
spatial loss before alpha, sampled as in training and over the full grid, on the same non-overlapping
block_size windows from the start of val.bin (topolm.validation), with log.jsonl's last evaluation beside
them for this project's runs; and GLUE results of finetune.py matched by their recorded pretrained
checkpoint (topolm.paper.glue_results: a folder given whose runs were finetuned from another checkpoint is
refused). Writes into `out` (default reports/<run folder name>): table.md and table.json (the model, the
control and the paper's numbers with their table or figure: topolm.paper.PAPER; an input that is missing is
listed as skipped with the reason, never as a number), and analyze.py's files (summary.json, units.npz,
compare_units.npz, the figures, clusters.png among them). All keys are fields of `ReproduceConfig`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from topolm.analysis_run import AnalysisKeys, fit_stimuli, load, measure_all, print_table, read_stimuli, write_outputs
from topolm.blimp import load_blimp_hub, load_blimp_local, score_blimp
from topolm.config import InferenceKeys, UserError, cli_main, load_config, require, resolve_device
from topolm.figures import json_safe
from topolm.files import (atomic_write, commit_staged, discard_staged, remove_partial_writes, require_writable,
                          staging_folder)
from topolm.paper import find_glue, glue_results, markdown, table_rows
from topolm.provenance import code_version
from topolm.signals import exit_on_stop, held
from topolm.tokenizer import gpt2_encoding
from topolm.validation import dataset_val_bin, last_logged_evaluation, read_tokens, start_windows, validation_measures


@dataclass
class ReproduceConfig(AnalysisKeys, InferenceKeys):
    """reproduce.py's keys: its own below; ckpt (the topographic model) and device from topolm.config.InferenceKeys;
    the analysis's keys (stimuli, contrasts, q, permutations, the statistics' choices, the clusters' settings,
    seed, ...) from topolm.analysis_run.AnalysisKeys, with the readout on by default."""
    control: str = ""
    """The non-topographic control (alpha = 0): a checkpoint or run folder; empty: its column is skipped."""
    out: str = ""
    """Output folder, relative to the current folder; empty: reports/<run folder name of ckpt>."""
    overwrite: bool = False
    """Write into an output folder that already holds a table.json."""
    fwhm: float = 2.0
    """fMRI-like readout of the analysis (topolm.analysis.StatisticsKeys; the paper's 2); 0: off (its row skipped)."""
    val_data: str = ""
    """Validation tokens of both models: a dataset folder (its val.bin; a name resolves under data/) or a .bin file;
    empty: val.bin of the data the topographic model was trained on (its checkpoint's `data`)."""
    val_tokens: int = 65536
    """Validation tokens: non-overlapping block_size windows from the start of val.bin, as many as fit."""
    val_batch_size: int = 8
    """Windows per batch of the validation pass; the sampled spatial loss is a per-batch loss (as in training)."""
    blimp: str = ""
    """BLiMP pairs: a folder of <paradigm>.jsonl files, or 'hub' (nyu-mll/blimp, the local cache first); empty:
    the BLiMP row is skipped."""
    paradigms: str = ""
    """Comma-separated BLiMP paradigms; empty: every paradigm found."""
    blimp_batch_size: int = 64
    """BLiMP sentences per forward pass."""
    glue: str = ""
    """Folder of the topographic model's GLUE runs (<task>/metrics.json); every task must record this checkpoint as
    its pretrained model; empty: the first folder under `glue_root` whose runs do, else skipped."""
    control_glue: str = ""
    """The same for the control."""
    glue_root: str = "finetuned"
    """Where GLUE runs are searched for when glue / control_glue is empty."""

    def __post_init__(self):
        super().__post_init__()
        require(self.val_tokens >= 1, f"val_tokens={self.val_tokens} must be >= 1")
        require(self.val_batch_size >= 1, f"val_batch_size={self.val_batch_size} must be >= 1")
        require(self.blimp_batch_size >= 1, f"blimp_batch_size={self.blimp_batch_size} must be >= 1")


def read_blimp(cfg: ReproduceConfig):
    """BLiMP's pairs, or the reason they are skipped; a folder given that cannot be read is an error."""
    if not cfg.blimp:
        return "no BLiMP pairs given (blimp=<folder of <paradigm>.jsonl files> or blimp=hub)"
    if cfg.blimp == "hub":
        try:
            return load_blimp_hub(cfg.paradigms)
        except UserError as e:
            return f"nyu-mll/blimp unavailable: {e}"
    return load_blimp_local(Path(cfg.blimp), cfg.paradigms)


def read_glue(given: str, root: str, digest: str):
    """GLUE results of the checkpoint of weights `digest`: from `given` (refused when they are another's), else
    found under `root`; the reason when there are none."""
    if given:
        if not Path(given).is_dir():
            raise UserError(f"glue folder not found: {given}")
        found = glue_results(Path(given), digest)
        return {**found, "folder": given} if found["tasks"] else f"no <task>/metrics.json in {given}"
    found, why = find_glue(Path(root), digest)
    return found if found is not None else why


def validation(cfg: ReproduceConfig, loaded, tokens, device: str):
    """topolm.validation's measures of one model on the start windows, or the reason they are skipped."""
    if isinstance(tokens, str):
        return tokens
    windows = start_windows(tokens, loaded.model.config.block_size, cfg.val_tokens)
    return validation_measures(loaded.model, windows, cfg.val_batch_size, cfg.seed, device)


def refuse_existing(out: Path, overwrite: bool) -> None:
    if (out / "table.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a table (table.json); choose another out= or set overwrite=true")


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: ReproduceConfig = load_config(ReproduceConfig, argv)
    device = resolve_device(cfg.device)
    full, localizer = read_stimuli(cfg)
    if cfg.out:  # refused before any model loads; the default out= is named after the model, checked below
        refuse_existing(Path(cfg.out), cfg.overwrite)
    pairs = read_blimp(cfg)
    models = [load(cfg, device, "model", cfg.ckpt, localizer)]
    if cfg.control:
        models.append(load(cfg, device, "compare", cfg.control, localizer))
    out = Path(cfg.out) if cfg.out else Path("reports") / models[0].name
    refuse_existing(out, cfg.overwrite)
    val_bin = dataset_val_bin(models[0].ckpt, cfg.val_data)
    tokens = read_tokens(val_bin) if val_bin else ("no val.bin: the checkpoint records no dataset found here; give "
                                                   "val_data=<dataset folder or .bin>")
    glue = [read_glue(given, cfg.glue_root, m.provenance["weights_sha256"])
            for given, m in zip((cfg.glue, cfg.control_glue), models)]
    stim, fit = fit_stimuli(full, models)
    existed = out.exists()
    remove_partial_writes(require_writable(out))
    start = time.time()
    try:
        results, summary, rows, record, written = measure_and_write(cfg, models, (stim, fit, full), (tokens, val_bin), pairs,
                                                                    glue, device, out)
    except BaseException:  # a stop or an error: a folder made for this table goes again
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    titles = (models[0].title, models[1].title if len(models) > 1 else "control (not given)")
    for loaded, _ in results:
        print_table(loaded, summary[loaded.label])
    print()
    print(markdown(rows, titles))
    print(f"{len(written) + 2} files in {out} ({time.time() - start:.0f} s): table.md, table.json, "
          f"{', '.join(sorted(p.name for p in written if p.parent == written[-1].parent))}, sites/")


def measure_and_write(cfg: ReproduceConfig, models: list, stimuli: tuple, val: tuple, pairs, glue: list, device: str,
                      out: Path):
    """Every measure of the models, the rows, and the files written into `out` through a staging folder (a stop
    or an error before the end leaves `out` as it was); `val`: the validation tokens (or why there are none) and
    their file. Returns (results, summary, rows, record, written)."""
    stim, fit, full = stimuli
    tokens, val_bin = val  # the tokens (or why there are none) and their file
    losses = [validation(cfg, loaded, tokens, device) for loaded in models]  # first: cheap, and refuses early
    results, summary = measure_all(cfg, models, stim, (full, fit))
    per_model = []
    for index, (loaded, _) in enumerate(results):
        entry = {"summary": summary[loaded.label], "glue": glue[index], "log": last_logged_evaluation(loaded.path, loaded.model.config.alpha),
                 "validation": losses[index]}
        if isinstance(pairs, str):
            entry["blimp"] = pairs
        else:
            scored = score_blimp(loaded.model, pairs, gpt2_encoding(), cfg.blimp_batch_size, device)
            entry["blimp"] = {key: v for key, v in scored.items() if key not in ("lp_good", "lp_bad", "scorable")}
        per_model.append(entry)
    rows = table_rows(per_model[0], per_model[1] if len(per_model) > 1 else None)
    titles = (models[0].title, models[1].title if len(models) > 1 else "control (not given)")
    record = {"models": {m.label: {"checkpoint": str(m.path), "provenance": m.provenance} for m in models},
              "val_bin": str(val_bin) if val_bin else None, "config": asdict(cfg), "code_version": code_version(),
              "rows": [r.as_json() for r in rows],
              "validation": [_validation_json(e["validation"]) for e in per_model],
              "glue": [e["glue"] for e in per_model], "blimp": [e["blimp"] for e in per_model]}
    stage = staging_folder(out)
    try:
        written = write_outputs(results, summary, cfg.q, stage)
        atomic_write(stage / "table.md", markdown(rows, titles))
        atomic_write(stage / "table.json", json.dumps(json_safe(record), indent=2, allow_nan=False, default=_jsonable) + "\n")
        with held(f"{out} holds the complete table"):
            commit_staged(stage, out)
    finally:
        discard_staged(stage)
    return results, summary, rows, record, written


def _validation_json(v):
    if isinstance(v, str):
        return {"skipped": v}
    return {k: (x.tolist() if hasattr(x, "tolist") else x) for k, x in v.items()}


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON: {type(x)}")


if __name__ == "__main__":
    cli_main(main)
