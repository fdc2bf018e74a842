"""The numbers of Rathi et al. (2025, TopoLM) that reproduce.py puts beside a model's, each with where the paper
gives it, and the pieces of reproduce.py's table: the rows from the measures, GLUE results matched to their
pretrained checkpoint, and the Markdown.

A row of the table is one measure of the topographic model and of its control (`Row`): a number, or skipped
with the reason (never 0 for a number not measured), the paper's numbers beside it and their source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from topolm.config import UserError
from topolm.files import read_json
from topolm.glue import GLUE_TASKS, task_score


@dataclass(frozen=True)
class PaperNumber:
    """One result of the paper: TopoLM's value, the control's (None: not reported), and its table or figure."""
    topolm: float | None
    control: float | None
    source: str
    note: str = ""


PAPER = {
    "val_task_loss": PaperNumber(3.075, 2.966, "Table 1", "FineWeb-Edu validation, GPT-2 small, 1024-token block"),
    "sampled_sl_sum": PaperNumber(0.108, None, "Section 3 (training), text", "at the end of training, summed over sites"),
    "blimp": PaperNumber(0.71, 0.76, "Table 1"),
    "glue_average": PaperNumber(0.68, 0.65, "Table 1", "GLUE validation, WNLI excluded"),
    "moran_verb_noun": PaperNumber(0.48, 0.11, "Figure 3", "verb-noun t-map, unsmoothed (Elli/Hauptman stimuli)"),
    "moran_verb_noun_smoothed": PaperNumber(0.81, 0.60, "Figure 3", "the same with the readout (FWHM 2)"),
    "moran_concrete_noun_verb": PaperNumber(0.80, None, "Figure 4", "noun-verb map of concrete words (Moseley stimuli)"),
    "moran_abstract_noun_verb": PaperNumber(0.23, None, "Figure 4", "noun-verb map of abstract words (Moseley stimuli)"),
    "brain_score": PaperNumber(0.78, 0.80, "Table 1", "Brain-Score language, best site"),
    "clusters": PaperNumber(None, None, "Figures 2a, 8, 9", "clusters of the localizer map; no count given"),
}
"""The paper's numbers by row key (reproduce.py's rows)."""


@dataclass
class Row:
    """One row of the table: key (of `PAPER`), label, the topographic model's and the control's value (a number,
    or None with `skipped` the reason), what the value is (`how`), extra numbers beside it (`beside`: name ->
    (topographic, control)), and the paper's numbers."""
    key: str
    label: str
    topo: float | None
    control: float | None
    how: str
    skipped: dict[str, str] = field(default_factory=dict)  # "topo" / "control" -> reason
    beside: dict[str, tuple] = field(default_factory=dict)

    def as_json(self) -> dict:
        paper = PAPER.get(self.key)
        return {"key": self.key, "label": self.label, "topolm": _num(self.topo), "control": _num(self.control),
                "how": self.how, "skipped": dict(self.skipped),
                "beside": {k: [_num(a), _num(b)] for k, (a, b) in self.beside.items()},
                "paper": None if paper is None else {"topolm": paper.topolm, "control": paper.control,
                                                     "source": paper.source, "note": paper.note}}


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _cell(x, reason: str | None = None) -> str:
    if reason:
        return "skipped"
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def markdown(rows: list[Row], titles: tuple[str, str]) -> str:
    """The table as Markdown: one line per row (the model, its control, the paper's two numbers and their source),
    the numbers beside (e.g. log.jsonl's evaluation, the full-grid spatial loss) in the row's notes, then every
    skipped input with its reason."""
    lines = [f"| result | {titles[0]} | {titles[1]} | paper TopoLM | paper control | paper source | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r.key)
        notes = [r.how] + [f"{name}: {_cell(a)} / {_cell(b)}" for name, (a, b) in r.beside.items()]
        lines.append(f"| {r.label} | {_cell(r.topo, r.skipped.get('topo'))} | {_cell(r.control, r.skipped.get('control'))} "
                     f"| {_cell(paper.topolm if paper else None)} | {_cell(paper.control if paper else None)} "
                     f"| {paper.source if paper else ''} | {'; '.join(n for n in notes if n)} |")
    skipped = [(r.label, which, why) for r in rows for which, why in r.skipped.items()]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {label} ({'topographic model' if which == 'topo' else 'control' if which == 'control' else which}): "
                  f"{why}" for label, which, why in skipped]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- GLUE

def glue_folders(root: Path) -> list[Path]:
    """Folders under `root` (itself included) that hold at least one <task>/metrics.json of a GLUE task."""
    root = Path(root)
    if not root.is_dir():
        return []
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    return [f for f in candidates if any((f / task / "metrics.json").is_file() for task in GLUE_TASKS)]


def glue_results(folder: Path, digest: str) -> dict:
    """Every GLUE task of `folder` (<task>/metrics.json, as finetune.py writes them) finetuned from the checkpoint
    whose weights digest is `digest` (topolm.provenance): {task: score}, the average over the tasks without WNLI
    (None without one), and the tasks averaged. Raises UserError, naming the file and both digests, for a task
    finetuned from another checkpoint or one whose metrics.json records none."""
    scores = {}
    for task in GLUE_TASKS:
        path = Path(folder) / task / "metrics.json"
        if not path.is_file():
            continue
        m = read_json(path)
        recorded = ((m.get("pretrained") or {}).get("provenance") or {}).get("weights_sha256")
        if recorded != digest:
            raise UserError(f"{path}: finetuned from another checkpoint (weights {recorded or 'not recorded'}) than the "
                            f"model it is reported for (weights {digest}); give the folder of this model's GLUE runs")
        scores[task] = task_score(task, m["splits"])
    counted = [v for k, v in scores.items() if k != "wnli"]
    return {"tasks": scores, "average": sum(counted) / len(counted) if counted else None, "n_tasks": len(counted)}


def find_glue(root: Path, digest: str) -> tuple[dict | None, str]:
    """The GLUE results of the checkpoint of weights `digest` among the folders under `root` (`glue_folders`): the
    first folder whose every task records this digest; (None, why) when no folder under root does."""
    folders = glue_folders(root)
    if not folders:
        return None, f"no GLUE runs (<task>/metrics.json) under {root}"
    for folder in folders:
        try:
            found = glue_results(folder, digest)
        except UserError:
            continue
        if found["tasks"]:
            return {**found, "folder": str(folder)}, ""
    return None, f"none of the GLUE runs under {root} was finetuned from this checkpoint"


# ----------------------------------------------------------------------------- the rows

def _value(entry, pick):
    """(value, None) from a measured entry, or (None, reason) from a skipped one (a str)."""
    if isinstance(entry, str):
        return None, entry
    return pick(entry), None


def _pair(topo: dict, control: dict | None, what: str, pick, key: str, label: str, how: str,
          beside: dict | None = None) -> Row:
    a, why_a = _value(topo[what], pick)
    b, why_b = _value(control[what], pick) if control is not None else (None, "no control= given")
    skipped = {k: v for k, v in (("topo", why_a), ("control", why_b)) if v}
    return Row(key, label, a, b, how, skipped, beside or {})


def _moran(summary: dict, contrast: str, smoothed: bool = False):
    """The site mean of Moran's I of a contrast (summary.json's `mean`), or the reason it is missing."""
    if contrast not in summary["mean"]:
        return (f"contrast {contrast} not run: give stimuli with a set declaring it and contrasts=all (e.g. the "
                f"shipped stimuli/concrete_abstract/concrete_abstract.tsv)")
    entry = summary["mean"][contrast]
    if smoothed:
        if "smoothed" not in entry:
            return "the readout was not run (fwhm=0)"
        entry = entry["smoothed"]
    return entry["morans_i"]


def table_rows(topo: dict, control: dict | None) -> list[Row]:
    """reproduce.py's rows from each model's measures: `validation` (topolm.validation.validation_measures, or the
    reason it is skipped), `log` (topolm.validation.last_logged_evaluation or None), `blimp` (topolm.blimp results
    or a reason), `glue` (`glue_results`/`find_glue` or a reason) and `summary` (summary.json's model part:
    topolm.analysis.summarize). A value that is a str is the reason it is skipped."""
    def log_of(m: dict, field: str):
        return m["log"][field] if m.get("log") else None

    def beside_log(field: str) -> tuple:
        return (log_of(topo, field), log_of(control, field) if control else None)

    rows = [
        _pair(topo, control, "validation", lambda v: v["task_loss"], "val_task_loss", "validation task loss (nats)",
              "mean cross-entropy over non-overlapping block_size windows from the start of val.bin",
              {"log.jsonl's last evaluation": beside_log("task_loss")}),
        _pair(topo, control, "validation", lambda v: v["sampled_sl_sum"], "sampled_sl_sum",
              "spatial loss, summed over sites (before alpha)",
              "sampled neighborhoods per batch of the same windows, as in training",
              {"full grid (every neighborhood)": tuple(
                  None if m is None or isinstance(m["validation"], str) else m["validation"]["full_grid_sl_sum"]
                  for m in (topo, control)),
               "log.jsonl's last evaluation": beside_log("sampled_sl_sum")}),
        _pair(topo, control, "blimp", lambda b: b["overall"]["accuracy"], "blimp", "BLiMP accuracy",
              "fraction of the scorable pairs whose grammatical sentence scores higher"),
        _pair(topo, control, "glue", lambda g: g["average"], "glue_average", "GLUE average (WNLI excluded)",
              "mean task score of the finetuned tasks found"),
    ]
    for key, contrast, smoothed, label in (
            ("moran_verb_noun", "verb_noun", False, "Moran's I, verb-noun t-map (site mean)"),
            ("moran_verb_noun_smoothed", "verb_noun", True, "Moran's I, verb-noun, readout (site mean)"),
            ("moran_concrete_noun_verb", "concrete_noun_verb", False, "Moran's I, noun-verb, concrete words"),
            ("moran_abstract_noun_verb", "abstract_noun_verb", False, "Moran's I, noun-verb, abstract words")):
        for m in (topo, control):
            if m is not None:
                m[key] = _moran(m["summary"], contrast, smoothed) if not isinstance(m["summary"], str) else m["summary"]
        rows.append(_pair(topo, control, key, lambda v: v, key, label, "mean over sites of Moran's I (queen contiguity)"))
    for m in (topo, control):
        if m is not None:
            m["clusters"] = m["summary"]["mean"].get("clusters", "the clusters were not measured")
    rows.append(_pair(topo, control, "clusters", lambda c: c["n_positive"], "clusters",
                      "clusters of the localizer map (positive, all sites)", "topolm.clusters; sizes in summary.json",
                      {"negative clusters": tuple(None if m is None or isinstance(m["clusters"], str)
                                                  else m["clusters"]["n_negative"] for m in (topo, control))}))
    brain = ("Brain-Score language needs brainscore-language in its own environment (numpy < 2, transformers < 5) "
             "and its neural data from the network; not run by this command")
    rows.append(Row("brain_score", "Brain-Score language", None, None, "", {"topo": brain, "control": brain}))
    return rows
