"""Measure and draw the topography of a trained model (the evaluation of Rathi et al. 2025).

    python analyze.py ckpt=out/<run> out=figures/<name>
    python analyze.py ckpt=out/<run> compare=out/<control run> out=figures/<name>
    python analyze.py ckpt=out/<run> fwhm=2 fdr=pooled moran=significant profile=abs   # the paper's statistics

`ckpt` (and `compare`) is a checkpoint file or a run folder (its newest checkpoint). Writes into
`out` (default figures/<run folder name>):
- localizer_maps.png, verb_noun_maps.png: the t-map of every site (S vs N; verbs vs nouns) on its
  sheet, selective units marked, for the model and, below it, the compared model;
- sites/<model|compare>/<contrast>/<site>.png: the same, one site per file, larger;
- morans_i.png: Moran's I of every site's t-maps with the 95% band of its shuffled-position null;
- correlation_vs_distance.png: mean correlation of unit pairs by grid distance on held-out text,
  beside the same curve with unit positions shuffled;
- response_profile.png: mean response of the language-selective units to S, W, J and N
  (cross-validated: selected on odd items, measured on even ones and vice versa);
- clusters.png: the clusters of every site's localizer t-map (topolm.clusters; seed_threshold,
  grow_threshold, min_size), a colour each; summary.json has their count and sizes and the response
  profile of each cluster found on one half of the localizer items, measured on the other;
- summary.json (per site and averaged, and under `stimuli` the items analysed and left out),
  units.npz (and compare_units.npz): per-unit arrays; both carry
  each model's provenance (checkpoint, step, weights digest, code version; in units.npz as the JSON
  string `provenance`).
A stimulus longer than the block (its tokens and the `<|endoftext|>` prefix; the smallest block_size of
the models analysed, so both are measured on the same items) is left out with its matched counterparts
(topolm.analysis.Stimuli.fitting), counted per condition in the console and in summary.json; a contrast
left with fewer than 2 items on a side is undefined, with the reason. A response that is not a number is
an error naming the site and the stimulus, before anything is written.
fwhm > 0 adds the fMRI-like readout (topolm.readout): every contrast's t-map and Moran's I on responses
smoothed on the sheet by a Gaussian of that FWHM (grid spacings; the paper's 2), each beside its null
(per shuffle: positions shuffled, then the responses smoothed, then t and I), and whether the model lies
outside it; written after the unsmoothed numbers, which stay the headline, with <contrast>_maps_smoothed.png.
fdr=pooled (one Benjamini-Hochberg over all sites' units), moran=significant (also Moran's I of the
significant units only) and profile=abs (mean absolute activation) are the paper's other choices.
stimuli= takes several stimulus sets (this project's set format, the shipped files, the research code's
layouts; topolm.stimsets) and contrasts= the contrasts to run (declared names, SIDE-SIDE, all); the
localizer's S - N always runs; every other contrast gets its maps and its Moran's I the same way.
All keys are fields of `AnalyzeConfig` (the measures' keys: topolm.analysis_run.AnalysisKeys).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from topolm.analysis_run import AnalysisKeys, fit_stimuli, load, measure_all, print_table, read_stimuli, write_staged
from topolm.config import InferenceKeys, UserError, cli_main, load_config, resolve_device
from topolm.files import remove_partial_writes, require_writable
from topolm.signals import exit_on_stop


@dataclass
class AnalyzeConfig(AnalysisKeys, InferenceKeys):
    """analyze.py's keys: its own below; ckpt (the model analysed) and device from topolm.config.InferenceKeys,
    what is measured and how (stimuli, contrasts, heldout, q, permutations, the statistics' choices, the clusters'
    settings, seed, ...) from topolm.analysis_run.AnalysisKeys."""
    compare: str = ""
    """Optional second model (e.g. the alpha=0 control), analysed the same way and drawn below the first."""
    out: str = ""
    """Output folder, relative to the current folder; empty: figures/<run folder name of ckpt> (of a Hugging
    Face folder: its own name)."""
    overwrite: bool = False
    """Write into an output folder that already holds a summary.json."""


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: AnalyzeConfig = load_config(AnalyzeConfig, argv)
    device = resolve_device(cfg.device)
    full, localizer = read_stimuli(cfg)
    models = [load(cfg, device, "model", cfg.ckpt, localizer)]
    if cfg.compare:
        models.append(load(cfg, device, "compare", cfg.compare, localizer))
    out = Path(cfg.out) if cfg.out else Path("figures") / models[0].name
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds an analysis (summary.json); choose another out= or set overwrite=true")
    stim, fit = fit_stimuli(full, models)
    existed = out.exists()
    remove_partial_writes(require_writable(out))
    start = time.time()
    try:
        results, summary = measure_all(cfg, models, stim, (full, fit))
        written = write_staged(results, summary, cfg.q, out)
    except BaseException:  # a stop or an error: a folder made for this analysis goes again
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise

    for loaded, _ in results:
        print_table(loaded, summary[loaded.label])
    top = sorted(p.name for p in written if p.parent == written[-1].parent)  # summary.json's folder: the top
    print(f"\n{len(written)} files in {out} ({time.time() - start:.0f} s): {', '.join(top)}, sites/")
    print(f"maps: {out / 'localizer_maps.png'}")


if __name__ == "__main__":
    cli_main(main)
