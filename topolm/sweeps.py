"""Many runs compared: the runs of a sweep grouped into configurations, seeds averaged, and the trade-off
between the task and the topography (`sweep.py` is the command).

- A run is a train.py run folder whose log.jsonl ends with its `end` record (`read_run`). Its config is
  the one its newest checkpoint stores (`topolm.checkpoint`), its validation task loss the `val.task`
  of the log's last `eval` record, its topography the site means of an analysis summary (summary.json
  as analyze.py writes it: `mean.<contrast>.morans_i` and `mean.spatial_loss` of its `model`).
- A configuration is the runs whose config values agree on every key that differs between the runs
  given, the keys of IGNORED_KEYS left out (the seed, the run's name and place, logging); so the seeds
  of one configuration are its replicates (`group_runs`).
- Per configuration and measure: the mean over its runs and the sample standard deviation (ddof=1, the
  error bar; undefined with one run); a measure undefined in one run (NaN, null in JSON) leaves the
  mean undefined too.
- Configurations are ordered by `alpha`, then by the other differing keys: a number by its value,
  any other value (a per-site alpha) by its JSON text, after the numbers. A configuration whose every site
  has weight 0 (`site_weights`: alpha, or alpha_attn / alpha_mlp / alpha_sites where the config has them)
  is the control.
"""
from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from topolm.config import UserError
from topolm.files import read_json, read_jsonl

IGNORED_KEYS = frozenset({
    "seed", "run_name", "out_dir", "init_from", "eval_only", "device", "backend", "compile", "wandb_log",
    "wandb_project", "wandb_run_name", "log_interval", "save_interval", "keep_last", "keep_every",
    "always_save_checkpoint", "topography", "topography_heldout_tokens", "topography_stimuli",
    "topography_null_shuffles", "topography_seed", "topography_image_interval"})
"""Config keys that never separate configurations: the seed (the replicate), the run's name and place,
how it was started (a resumed run says init_from=resume) and where it ran, and what it logs, measures
while training (topography*: the model trains the same with or without them) and keeps."""

MEASURES = ("val_task_loss", "morans_i", "spatial_loss")
"""The numbers of every run and configuration, in the table's order."""


@dataclass
class Run:
    """One finished run: its folder, config, newest checkpoint, last evaluation and analysis summary."""
    path: Path
    config: dict
    checkpoint: Path
    step: int
    eval_iter: int
    val_task_loss: float
    summary: dict | None = None  # the `model` part of summary.json; None until read or measured
    summary_path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def measure(self, contrast: str) -> dict[str, float]:
        """The run's numbers: its validation task loss, the site-mean Moran's I of `contrast` and the
        site-mean full-grid spatial loss of its analysis (NaN where the analysis has it undefined)."""
        mean = self.summary["mean"]
        if contrast not in mean:
            have = ", ".join(k for k, v in mean.items() if isinstance(v, dict) and "morans_i" in v)
            raise UserError(f"{self.summary_path}: the analysis has no contrast {contrast!r} (it has {have}); "
                            f"choose contrast= among those")
        return {"val_task_loss": self.val_task_loss, "morans_i": _number(mean[contrast]["morans_i"]),
                "spatial_loss": _number(mean["spatial_loss"])}


def _number(x) -> float:
    return math.nan if x is None else float(x)


# ----------------------------------------------------------------------------- reading runs

def expand_runs(spec: str) -> list[Path]:
    """The run folders `spec` names: comma-separated paths, each a folder or a glob (`out/sweep/*`); files a
    glob matches are skipped, a folder named twice counts once. Raises UserError when nothing matched."""
    found: list[Path] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        for m in matches:
            p = Path(m)
            if p.is_dir() and p.resolve() not in {f.resolve() for f in found}:
                found.append(p)
            elif not glob.has_magic(item) and not p.is_dir():
                raise UserError(f"runs: {item} is not a run folder; give train.py run folders (out/<run>) or a glob")
    if not found:
        raise UserError(f"runs={spec}: no run folder matched; give run folders or a glob of them, e.g. "
                        f"runs='out/alpha-sweep/*'")
    return found


def last_evaluation(run_dir: Path) -> tuple[int, float]:
    """(iteration, validation task loss) of the last `eval` record of a finished run's log.jsonl. Raises
    UserError for a run without a log, one whose log does not end with `end` (still running, stopped or
    killed), or one without an evaluation."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no log.jsonl; not a train.py run folder (remove it from runs=)")
    records = [r for _, r in read_jsonl(path)]
    last = records[-1] if records else {}
    if last.get("event") != "end":
        at = f"its last record is {last.get('event')!r} at iteration {last.get('iter')}" if last else "it is empty"
        raise UserError(f"{path}: the run has not finished ({at}); let it finish, resume it (init_from=resume) "
                        f"or leave it out of runs=")
    evals = [r for r in records if r.get("event") == "eval"]
    if not evals:
        raise UserError(f"{path}: the run logged no evaluation; it has no validation loss")
    return int(evals[-1]["iter"]), float(evals[-1]["val"]["task"])


def read_run(run_dir: Path) -> Run:
    """A finished run: its log's last evaluation (`last_evaluation`), its newest checkpoint's config and
    step. Raises UserError as `last_evaluation` and topolm.checkpoint do."""
    from topolm.checkpoint import find_checkpoint, load_checkpoint

    eval_iter, val_task = last_evaluation(run_dir)
    path = find_checkpoint(run_dir)
    ckpt = load_checkpoint(path)
    return Run(Path(run_dir), dict(ckpt["config"]), path, int(ckpt["iter_num"]), eval_iter, val_task)


def attach_summary(run: Run, folders: list[Path]) -> bool:
    """Read the run's analysis, `<folder>/<run name>/summary.json` of the first folder holding one, into
    `run`; False when none does. Raises UserError for a summary of another checkpoint of the run."""
    for folder in folders:
        path = Path(folder) / run.name / "summary.json"
        if path.is_file():
            model = read_json(path).get("model") or {}
            if "mean" not in model:
                raise UserError(f"{path}: no analysis of a model (no 'model.mean'); not a summary.json of analyze.py")
            if int(model.get("step", -1)) != run.step:
                raise UserError(f"{path} analyses step {model.get('step')} of {run.name}, whose newest checkpoint "
                                f"is step {run.step}; analyse it again (python analyze.py ckpt={run.path} "
                                f"overwrite=true) or remove that summary")
            run.summary, run.summary_path = model, path
            return True
    return False


# ----------------------------------------------------------------------------- configurations

def varying_keys(configs: list[dict]) -> list[str]:
    """The config keys, sorted, whose values are not the same in every config (a key missing from some
    counts as differing), IGNORED_KEYS left out."""
    keys = sorted(set().union(*configs) - IGNORED_KEYS)
    return [k for k in keys if len({_canonical(c.get(k)) for c in configs}) > 1]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def order_key(value) -> tuple:
    """How configurations sort by one key's value: numbers (not bools) by value, then anything else by its
    JSON text (e.g. a per-site alpha)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, _canonical(value))


def site_weights(config: dict) -> list:
    """The spatial-loss weights a run config gives its sites: `alpha_sites` where given, else the attention
    and MLP sites' `alpha_attn` and `alpha_mlp`, each falling back to `alpha` (a config without those keys:
    `alpha` for both). Values are returned as stored (a number, or an opaque per-site value)."""
    if config.get("alpha_sites"):
        return list(config["alpha_sites"])
    alpha = config.get("alpha")
    return [alpha if config.get(k) is None else config[k] for k in ("alpha_attn", "alpha_mlp")]


def is_control(alpha) -> bool:
    """Whether a config's alpha trains the non-topographic control: the number 0, or (a per-site alpha) a
    mapping or list whose every value is 0. A missing alpha (None) is no control."""
    if isinstance(alpha, dict):
        return bool(alpha) and all(is_control(v) for v in alpha.values())
    if isinstance(alpha, (list, tuple)):
        return bool(alpha) and all(is_control(v) for v in alpha)
    return isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 0


def seed_statistics(values: list[float]) -> dict:
    """mean and sd (sample standard deviation, ddof=1; NaN with one value) of one measure over a
    configuration's runs, and n; NaN in any run makes both NaN."""
    x = np.asarray(values, np.float64)
    if np.isnan(x).any():
        return {"mean": math.nan, "sd": math.nan, "n": len(x)}
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else math.nan, "n": len(x)}


def _show(value) -> str:
    """A config value in a label: a float as %g (alpha=10, not 10.0), '' for the empty string, else JSON."""
    if isinstance(value, float):
        return f"{value:g}"
    return "''" if value == "" else value if isinstance(value, str) else _canonical(value)


def group_runs(runs: list[Run], contrast: str) -> dict:
    """The sweep's table (sweep.json): `keys` (the differing config keys), and `configurations`, ordered by
    alpha then the other keys (`order_key`), each with its `config` (those keys' values), `label`,
    `control`, its `runs` (run folder, seed, checkpoint step, the three measures and their sources) and
    per measure of MEASURES the seed statistics (`seed_statistics`)."""
    keys = varying_keys([r.config for r in runs])
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_canonical({k: run.config.get(k) for k in keys}), []).append(run)
    ordered = sorted(groups.values(), key=lambda rs: (order_key(rs[0].config.get("alpha")),
                                                      [order_key(rs[0].config.get(k)) for k in keys]))
    configurations = []
    for members in ordered:
        config = {k: members[0].config.get(k) for k in keys}
        rows = [{"run": str(r.path), "seed": r.config.get("seed"), "step": r.step, "eval_iter": r.eval_iter,
                 "summary": str(r.summary_path), **r.measure(contrast)} for r in members]
        entry = {"config": config, "label": ", ".join(f"{k}={_show(v)}" for k, v in config.items()) or "all runs",
                 "control": is_control(site_weights(members[0].config)), "runs": rows}
        entry.update({m: seed_statistics([row[m] for row in rows]) for m in MEASURES})
        configurations.append(entry)
    return {"contrast": contrast, "keys": keys, "ignored_keys": sorted(IGNORED_KEYS),
            "error_bars": "sample standard deviation over the configuration's runs (ddof=1); none with one run",
            "configurations": configurations}


# ----------------------------------------------------------------------------- outputs

def _cell(stat: dict) -> str:
    if stat["mean"] != stat["mean"]:
        return "undefined"
    return f"{stat['mean']:.4f}" + ("" if stat["sd"] != stat["sd"] else f" ± {stat['sd']:.4f}")


def markdown_table(table: dict) -> str:
    """The table as Markdown: one row per configuration (mean ± sd over its runs), the control marked."""
    contrast = table["contrast"]
    lines = [f"| configuration | control | runs | val task loss | Moran's I ({contrast}) | spatial loss | run folders |",
             "|---|---|---|---|---|---|---|"]
    for c in table["configurations"]:
        folders = ", ".join(Path(r["run"]).name for r in c["runs"])
        lines.append(f"| {c['label']} | {'control' if c['control'] else ''} | {len(c['runs'])} | "
                     f"{_cell(c['val_task_loss'])} | {_cell(c['morans_i'])} | {_cell(c['spatial_loss'])} | {folders} |")
    lines.append("")
    lines.append(f"mean ± {table['error_bars']}; configurations differ in: {', '.join(table['keys']) or 'nothing'}.")
    return "\n".join(lines) + "\n"


PANELS = (("morans_i", "Moran's I ({contrast}), site mean"), ("spatial_loss", "full-grid spatial loss, site mean"))
"""The trade-off plot's panels: the measure on x (validation task loss on y) and its axis label."""


def plot_tradeoff(table: dict):
    """The trade-off figure: validation task loss (y) against each measure of PANELS (x), one point per
    configuration with its seeds' sd as error bars in x and y, the control drawn as a red square. The
    points of panel k are `fig.axes[k].containers` in the order of `table['configurations']`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4.5), sharey=True)
    for ax, (measure, label) in zip(axes, PANELS):
        for c in table["configurations"]:
            x, y = c[measure], c["val_task_loss"]
            style = dict(fmt="s", color="tab:red", ms=8) if c["control"] else dict(fmt="o", color="tab:blue", ms=6)
            ax.errorbar([x["mean"]], [y["mean"]], xerr=[_bar(x["sd"])], yerr=[_bar(y["sd"])], capsize=3,
                        label="control (alpha = 0)" if c["control"] else None, **style)
            ax.annotate(c["label"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label.format(contrast=table["contrast"]))
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)  # room for the labels beside the outermost points
    axes[0].set_ylabel("validation task loss (nats)")
    if any(c["control"] for c in table["configurations"]):
        axes[0].legend(loc="best", fontsize=8)
    runs = sum(len(c["runs"]) for c in table["configurations"])
    fig.suptitle(f"{len(table['configurations'])} configurations, {runs} runs; error bars: sd over seeds")
    fig.tight_layout()
    return fig


def _bar(sd: float) -> float:
    return 0.0 if sd != sd else sd  # one run: no bar


# ----------------------------------------------------------------------------- analysing a run

def analyse_checkpoint(ckpt: Path, device: str = "cpu", **keys) -> dict:
    """summary.json's `analysis`, `stimuli` and `model` parts for one checkpoint, measured exactly as `python
    analyze.py ckpt=<ckpt>` measures them (topolm.analysis_run: the same inputs, measures and summary;
    `keys` are analyze.py's keys, e.g. seed=1), without writing its figures.
    Raises UserError as analyze.py does (no GPT-2 tokenizer, a response that is not a number)."""
    from topolm.analysis_run import AnalysisKeys, fit_stimuli, load, measure_all, read_stimuli

    cfg = AnalysisKeys(**keys)
    full, localizer = read_stimuli(cfg)
    models = [load(cfg, device, "model", str(ckpt), localizer)]
    stim, fit = fit_stimuli(full, models)
    _, summary = measure_all(cfg, models, stim, (full, fit))
    summary["analysis"]["by"] = "sweep.py (analyze.py's measures, no figures)"
    return summary
