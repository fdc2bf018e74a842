"""The GLUE benchmark: its tasks, its metrics, and reading its data (no torch needed).

Tasks and metrics as on the GLUE leaderboard (Wang et al. 2019): Matthews correlation for CoLA,
Pearson and Spearman for STS-B, F1 and accuracy for MRPC and QQP, accuracy otherwise; MNLI has a
matched and a mismatched validation split. Data come from `nyu-mll/glue` through `datasets`, or from
local files (`<task>/<split>.parquet|.jsonl|.tsv`) read exactly as text: no missing-value guessing in
text columns, standard TSV quoting detected and undone, bytes that are not UTF-8 refused with the
file and line.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from topolm.config import UserError
from topolm.files import read_jsonl, read_text, require_text_fields
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding

# ----------------------------------------------------------------------------- tasks and metrics

class GlueTask(NamedTuple):
    text_columns: tuple[str, ...]  # one column, or the two columns of a sentence pair
    n_outputs: int  # classes, or 1 for regression
    metrics: tuple[str, ...]
    val_splits: tuple[str, ...]


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), 2, ("mcc",), ("validation",)),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",), ("validation",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("validation",)),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "accuracy"), ("validation",)),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman"), ("validation",)),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",), ("validation",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
}


def matthews_corr(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when a marginal is constant."""
    classes = np.union1d(pred, gold)
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(conf, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
    t, p, n, correct = conf.sum(1), conf.sum(0), conf.sum(), np.trace(conf)
    denom = math.sqrt((n * n - t @ t) * (n * n - p @ p))
    return float((correct * n - t @ p) / denom) if denom > 0 else 0.0


def f1_positive(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def compute_metrics(task: str, pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    out = {}
    for name in GLUE_TASKS[task].metrics:
        if name == "mcc":
            out[name] = matthews_corr(pred, gold)
        elif name == "accuracy":
            out[name] = float(np.mean(pred == gold))
        elif name == "f1":
            out[name] = f1_positive(pred, gold)
        elif name == "pearson":
            out[name] = pearson(pred.astype(np.float64), gold.astype(np.float64))
        elif name == "spearman":
            out[name] = pearson(average_ranks(pred), average_ranks(gold))
    return out


def task_score(task: str, splits: dict[str, dict[str, float]]) -> float:
    """One number per task, as on the GLUE leaderboard: the mean of its metrics (and, for MNLI,
    of matched and mismatched)."""
    values = [splits[s][m] for s in GLUE_TASKS[task].val_splits for m in GLUE_TASKS[task].metrics]
    return float(np.mean(values))


# ----------------------------------------------------------------------------- data

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".tsv")


@dataclass
class Examples:
    """Tokenized examples of one split: token ids per example and the labels."""
    ids: list[np.ndarray]
    labels: np.ndarray  # int64 class ids, or float32 scores for regression
    truncated: int = 0  # examples cut to max_length

    def __len__(self) -> int:
        return len(self.ids)


_QUOTED_FIELD = re.compile(r'^"(?:[^"]|"")*"$')


def _tsv_is_quoted(lines: list[str]) -> bool:
    """Whether a TSV was written with standard CSV quoting (pandas/`datasets` `to_csv`): some field is
    wrapped in quotes with its inner quotes doubled. Raw GLUE TSVs never quote (their sentences hold
    unbalanced quotes), so a field like `""` inside a wrapped one only appears in quoted files."""
    for line in lines:
        for field in line.split("\t"):
            if _QUOTED_FIELD.match(field) and '""' in field[1:-1]:
                return True
    return False


def _read_tsv(path: Path, columns: list[str], task: str) -> dict[str, list[str]]:
    text = read_text(path)
    # split at line feeds only: str.splitlines would also split inside a sentence holding U+2028 or U+0085
    quoting = csv.QUOTE_MINIMAL if _tsv_is_quoted(text.split("\n")) else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise UserError(f"{path} is empty (expected a header line with {', '.join(columns)})")
        _require_columns(f"{path.parent} {path.stem}", header, columns, task)
        where = [header.index(c) for c in columns]
        out = {c: [] for c in columns}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"{path} line {reader.line_num}: {len(row)} fields where the header has "
                                f"{len(header)}")
            for c, i in zip(columns, where):
                out[c].append(row[i])
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: {e}") from e
    return out


def _read_jsonl(path: Path, columns: list[str], task: str) -> dict[str, list]:
    out = {c: [] for c in columns}
    for n, record in read_jsonl(path):
        _require_columns(f"{path.parent} {path.stem}" + (f" line {n}" if out[columns[0]] else ""), list(record),
                         columns, task)
        # Text may be empty (QQP's train split holds two empty question2, on the Hub too), never missing.
        require_text_fields(record, GLUE_TASKS[task].text_columns, f"{path} line {n}", allow_empty=True)
        for c in columns:
            out[c].append(record[c])
    return out


def _read_parquet(path: Path, columns: list[str], task: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    _require_columns(f"{path.parent} {path.stem}", names, columns, task)
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}


def _require_columns(where: str, have: list[str], need: list[str], task: str) -> None:
    missing = [c for c in need if c not in have]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)} for {task} (has {', '.join(map(str, have))})")


def _local_split(folder: Path, split: str, columns: list[str], task: str) -> dict[str, list]:
    """The `columns` of one local split file, read exactly: only those columns, text kept as text."""
    found = [folder / f"{split}{s}" for s in DATA_SUFFIXES if (folder / f"{split}{s}").is_file()]
    if not found:
        raise UserError(f"no {split} file in {folder} (expected {split}.parquet, .jsonl or .tsv)")
    path = found[0]
    reader = {".parquet": _read_parquet, ".tsv": _read_tsv}.get(path.suffix, _read_jsonl)
    data = reader(path, columns, task)
    for c in columns[:-1]:  # text columns: a missing sentence is an error, never an empty string
        for n, value in enumerate(data[c]):
            if not isinstance(value, str):
                raise UserError(f"{path}: row {n + 1} has no text in column {c} ({value!r})")
    return data


def load_glue(task: str, data_dir: str) -> dict[str, dict[str, list]]:
    """The task's train and validation split(s), each as {column: values} for its text columns and
    `label`, from local files or the Hub (`nyu-mll/glue` through `datasets`)."""
    spec = GLUE_TASKS[task]
    splits = ("train",) + spec.val_splits
    columns = list(spec.text_columns) + ["label"]
    if data_dir:
        folder = Path(data_dir) / task
        if not folder.is_dir():
            raise UserError(f"data folder not found: {folder} (data_dir holds one folder per task)")
        return {s: _local_split(folder, s, columns, task) for s in splits}
    from topolm.hub import load_hub_dataset

    hub = load_hub_dataset("nyu-mll/glue", task, offline_key=f"pass data_dir=<folder with {task}/<split>.jsonl, "
                                                              f".tsv or .parquet files> to read GLUE from local files")
    return {s: {c: list(hub[s][c]) for c in columns} for s in splits}


def join_pair(a: list[int], b: list[int] | None, max_length: int) -> tuple[list[int], bool]:
    """One example's token ids: a, or a + EOT + b; cut to max_length (pairs longest-first)."""
    if b is None:
        return a[:max_length], len(a) > max_length
    budget = max_length - 1
    if len(a) + len(b) <= budget:
        return a + [EOT_TOKEN] + b, False
    if len(a) <= budget // 2:
        keep_a, keep_b = len(a), budget - len(a)
    elif len(b) <= budget // 2:
        keep_a, keep_b = budget - len(b), len(b)
    else:
        keep_a, keep_b = budget - budget // 2, budget // 2
    return a[:keep_a] + [EOT_TOKEN] + b[:keep_b], True


def tokenize(data: dict[str, list], task: str, max_length: int, limit: int = 0, where: str = "") -> Examples:
    """Token ids (text, or a + EOT + b for pairs, cut to max_length) and labels of one split."""
    spec = GLUE_TASKS[task]
    n = len(data["label"]) if not limit else min(limit, len(data["label"]))
    enc = gpt2_encoding()
    encoded = [enc.encode_ordinary_batch(list(data[c][:n])) for c in spec.text_columns]
    try:
        labels = np.asarray(data["label"][:n], dtype=np.float32 if spec.n_outputs == 1 else np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: labels must be numbers as in nyu-mll/glue ({e})") from e
    if spec.n_outputs > 1:
        bad = ~np.isin(labels, np.arange(spec.n_outputs))
        if bad.any():
            raise UserError(f"{where}: label {labels[bad][0]:g} is not a class of {task} "
                            f"(0..{spec.n_outputs - 1}; the unlabeled test split cannot be used)")
        labels = labels.astype(np.int64)
    elif not np.isfinite(labels).all():
        raise UserError(f"{where}: non-finite regression label")
    ids, truncated = [], 0
    for i in range(n):
        toks, cut = join_pair(encoded[0][i], encoded[1][i] if len(encoded) > 1 else None, max_length)
        ids.append(np.asarray(toks or [EOT_TOKEN], dtype=np.int64))  # an empty text still needs one token
        truncated += cut
    return Examples(ids, labels, truncated)
