"""One table over every GLUE task finetuned so far (the metrics.json files that finetune.py writes).

    python glue_summary.py                     # finetuned/*/metrics.json
    python glue_summary.py dir=finetuned/control json=summary.json

A task's score is the mean of its metrics (MNLI: of matched and mismatched accuracy), as on the
GLUE leaderboard; the average leaves WNLI out, as the paper does, and says how many tasks it covers.
All numbers are fractions (the paper's GLUE average: TopoLM 0.68, control 0.65). The JSON table gives each
task's pretrained model with its provenance (checkpoint, step, weights digest, code version: topolm/provenance.py,
as finetune.py recorded it) and the code version of the summary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from topolm.config import UserError, cli_main, load_config, require
from topolm.files import atomic_write, read_json, require_json_target
from topolm.glue import GLUE_TASKS, task_score
from topolm.provenance import code_version


@dataclass
class SummaryConfig:
    dir: str = "finetuned"
    """Folder holding one <task>/metrics.json per finetuned task."""
    json: str = ""
    """Also write the table as JSON to this file (a folder: a value ending in / or an existing folder gets
    glue_summary.json inside it)."""

    def __post_init__(self):
        require(bool(self.dir), "dir= is empty; name the folder that holds <task>/metrics.json")


def collect(folder: Path) -> dict[str, dict]:
    found = {}
    for task in GLUE_TASKS:
        path = folder / task / "metrics.json"
        if path.is_file():
            found[task] = read_json(path)
    return found


def summarize(folder: Path) -> tuple[list[dict], float | None, int]:
    rows = []
    for task, m in collect(folder).items():
        splits = m["splits"]
        details = ", ".join(f"{s.replace('validation_', '').replace('validation', 'val')} {k} {splits[s][k]:.4f}"
                            for s in GLUE_TASKS[task].val_splits for k in GLUE_TASKS[task].metrics)
        rows.append({"task": task, "score": task_score(task, splits), "details": details,
                     "best_iter": m.get("best_iter"), "stop_reason": m.get("stop_reason"),
                     "pretrained": (m.get("pretrained") or {}).get("path"),
                     "pretrained_provenance": (m.get("pretrained") or {}).get("provenance")})
    counted = [r["score"] for r in rows if r["task"] != "wnli"]
    average = sum(counted) / len(counted) if counted else None
    return rows, average, len(counted)


def main(argv: list[str]) -> None:
    cfg: SummaryConfig = load_config(SummaryConfig, argv)
    folder = Path(cfg.dir)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    target = require_json_target(cfg.json, "glue_summary.json")
    rows, average, n = summarize(folder)
    if not rows:
        raise UserError(f"no <task>/metrics.json in {folder}; run finetune.py first")
    print(f"GLUE validation results in {folder}")
    print(f"{'task':<6} {'score':>7}  {'best step':>9}  {'stopped by':<16} metrics")
    for r in rows:
        print(f"{r['task']:<6} {r['score']:>7.4f}  {r['best_iter']:>9}  {r['stop_reason'] or '':<16} {r['details']}")
    if average is not None:
        print(f"{'avg':<6} {average:>7.4f}  (mean over {n} task(s), WNLI excluded)")
    if target is not None:
        atomic_write(target, json.dumps({"rows": rows, "average_excluding_wnli": average,
                                                 "tasks_in_average": n, "code_version": code_version()},
                                                indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    cli_main(main)
