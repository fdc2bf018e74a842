"""Compare the runs of a sweep: a table and the trade-off plot of task loss against topography.

    python sweep.py runs='out/alpha-sweep/*'
    python sweep.py runs=out/a0-s1,out/a2.5-s1,out/a2.5-s2 out=figures/my-sweep contrast=verb_noun

`runs` takes train.py run folders, comma-separated, each a folder or a glob. Every run must have
finished (its log.jsonl ends with the `end` record). Per run: the config its newest checkpoint stores,
the validation task loss of its log's last evaluation, and the site means of its analysis (Moran's I of
`contrast`, the full-grid spatial loss) from `<analyses>/<run folder name>/summary.json` as analyze.py
writes it; a run without one is measured here as analyze.py measures it with its defaults (no figures),
into `<out>/analyses/<run folder name>/summary.json`, which later sweeps into `out` reuse.

Runs are grouped into configurations by the config keys whose values differ between them, except the
seed and keys that do not change the model (topolm.sweeps.IGNORED_KEYS); configurations are ordered by
alpha, and alpha = 0 is the control. Writes into `out`: sweep.json (every run's numbers, every
configuration's mean and sample standard deviation over its runs), sweep.md (the table) and
tradeoff.png (validation task loss against Moran's I and against the spatial loss, one point per
configuration, sd over seeds as error bars, the control a red square).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from topolm.config import DeviceKey, SeedKey, UserError, cli_main, load_config, require, resolve_device
from topolm.figures import json_safe, save_figure
from topolm.files import atomic_write, commit_staged, discard_staged, remove_partial_writes, require_writable, \
    staging_folder
from topolm.sweeps import analyse_checkpoint, attach_summary, expand_runs, group_runs, markdown_table, \
    plot_tradeoff, read_run


@dataclass
class SweepConfig(DeviceKey, SeedKey):
    """sweep.py's keys: its own below, device from topolm.config.DeviceKey, seed (of the analyses it runs)
    from topolm.config.SeedKey."""
    runs: str = ""
    """Run folders, comma-separated; each a folder or a glob (quote it: runs='out/alpha-sweep/*'), whose
    files are skipped."""
    out: str = "figures/sweep"
    """Output folder of sweep.json, sweep.md and tradeoff.png (and the analyses measured here)."""
    overwrite: bool = False
    """Write into an output folder that already holds a sweep.json."""
    analyses: str = "figures"
    """Folder of analyze.py's outputs: a run's analysis is <analyses>/<run folder name>/summary.json (analyze.py's
    default out), else <out>/analyses/<run folder name>/summary.json."""
    analyze: bool = True
    """Measure a run that has no analysis (analyze.py's defaults, no figures: under a minute per demo run on 2
    CPU cores); false refuses such a run instead."""
    contrast: str = "localizer"
    """The contrast whose site-mean Moran's I is plotted (a contrast the analyses ran: localizer, verb_noun, ...)."""
    seed: int = 0
    """Seed of the analyses measured here (analyze.py's default 0: the same numbers as its summary)."""
    permutations: int = 999
    """Permutations of each Moran's I p-value in the analyses measured here (analyze.py's key and default)."""
    null_shuffles: int = 100
    """Position shuffles of the nulls in the analyses measured here (analyze.py's key and default)."""
    heldout_tokens: int = 8192
    """Held-out tokens of the correlations in the analyses measured here (analyze.py's key and default)."""

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.runs.strip()), "runs= is required: run folders or a glob of them, e.g. runs='out/alpha-sweep/*'")
        require(bool(self.contrast), "contrast= must name a contrast, e.g. localizer")


def read_runs(cfg: SweepConfig, out: Path) -> tuple[list, list]:
    """Every run of `runs` (topolm.sweeps.read_run) with its analysis where one exists, and those without.
    Raises UserError for a run that cannot be compared, before anything is written."""
    runs = [read_run(p) for p in expand_runs(cfg.runs)]
    names: dict[str, Path] = {}
    for run in runs:
        if run.name in names:
            raise UserError(f"runs: {names[run.name]} and {run.path} share the folder name {run.name!r}, which names "
                            f"their analyses; rename one (or compare them in two sweeps)")
        names[run.name] = run.path
    missing = [r for r in runs if not attach_summary(r, [Path(cfg.analyses), out / "analyses"])]
    for run in runs:
        if run.summary is not None:
            run.measure(cfg.contrast)  # a contrast the analysis lacks is refused here, before any work
    if missing and not cfg.analyze:
        raise UserError(f"no analysis of {', '.join(str(r.path) for r in missing)} in {cfg.analyses}/ or "
                        f"{out / 'analyses'}/; run python analyze.py ckpt=<run> or set analyze=true")
    return runs, missing


def main(argv: list[str]) -> None:
    cfg: SweepConfig = load_config(SweepConfig, argv)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if (out / "sweep.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a sweep (sweep.json); choose another out= or set overwrite=true")
    runs, missing = read_runs(cfg, out)
    remove_partial_writes(require_writable(out))
    for k, run in enumerate(missing, 1):
        print(f"analysing {run.path} ({k} of {len(missing)}): {run.checkpoint}")
        summary = analyse_checkpoint(run.checkpoint, device, seed=cfg.seed, permutations=cfg.permutations,
                                     null_shuffles=cfg.null_shuffles, heldout_tokens=cfg.heldout_tokens)
        path = out / "analyses" / run.name / "summary.json"
        atomic_write(path, json.dumps(json_safe(summary), indent=2) + "\n")
        run.summary, run.summary_path = summary["model"], path
    table = {"runs_given": cfg.runs, **group_runs(runs, cfg.contrast)}
    stage = staging_folder(out)
    try:
        atomic_write(stage / "sweep.json", json.dumps(json_safe(table), indent=2) + "\n")
        atomic_write(stage / "sweep.md", markdown_table(table))
        save_figure(plot_tradeoff(table), stage / "tradeoff.png")
        commit_staged(stage, out)
    finally:
        discard_staged(stage)
    print(markdown_table(table))
    print(f"{len(runs)} runs in {len(table['configurations'])} configurations: {out / 'sweep.md'}, "
          f"{out / 'sweep.json'}, {out / 'tradeoff.png'}")


if __name__ == "__main__":
    cli_main(main)
