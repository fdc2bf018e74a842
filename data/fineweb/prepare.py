"""Tokenize FineWeb-Edu (`sample-10BT`) into train.bin / val.bin beside this file (SPEC section 5).

    python data/fineweb/prepare.py                              # download through `datasets`
    python data/fineweb/prepare.py --files shard-*.parquet      # local parquet/jsonl files, offline

Each document is GPT-2 BPE-encoded (tiktoken `gpt2`) with one end-of-text token (50256)
appended; 0.0005 of the documents (seed 42) form the validation split. Token ids are written as
a flat uint16 array. The reference run gave about 9.04B train and 4.43M val tokens (train.bin
about 17 GB).

Design decisions
- The validation documents are exactly those that `datasets`' train_test_split(test_size,
  seed=42, shuffle=True) would pick (the research code's split); both files keep the source
  order, so that the corpus is read front to back in contiguous slices.
- `--num_proc` forked workers each read their own slices of the memory-mapped Arrow table and
  return uint16 arrays; the parent only appends bytes to the two files, in slice order, so the
  output does not depend on the number of workers. (datasets.map was 8x slower than one
  in-process stream on a 10 MB corpus: process start and Arrow cache writes dominated.)
- Each .bin is written under a temporary name and renamed when complete.
"""
import argparse
import itertools
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from common import EOT_TOKEN, gpt2_encoding, write_tokens_meta  # noqa: E402

SLICE_DOCS = 512  # at most this many documents per work item: enough to amortise the hand-off

_WORKER = {}  # the dataset, text column, validation mask and encoding each worker uses


def validation_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for the documents that datasets' train_test_split(val_fraction, seed, shuffle=True) puts in test."""
    n_val = math.ceil(val_fraction * n_docs)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return mask


def _init_worker(ds, text_column: str, is_val: np.ndarray) -> None:
    _WORKER.update(ds=ds, text_column=text_column, is_val=is_val, enc=gpt2_encoding())


def _encode_slice(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids (with EOT after each document) of documents [start, end): train part, val part."""
    start, end = bounds
    texts = _WORKER["ds"][start:end][_WORKER["text_column"]]
    encode = _WORKER["enc"].encode_ordinary  # (encode_ordinary_batch is 2x slower per document here)
    docs = [encode(t or "") for t in texts]
    is_val = _WORKER["is_val"][start:end]
    parts = ([], [])
    for doc, val in zip(docs, is_val):
        doc.append(EOT_TOKEN)
        parts[int(val)].append(doc)
    flat = [np.fromiter(itertools.chain.from_iterable(p), dtype=np.uint16, count=sum(map(len, p))) for p in parts]
    return flat[0], flat[1], len(parts[0]), len(parts[1])


def tokenize_to_files(ds, text_column: str, out_dir: Path, num_proc: int, val_fraction: float, seed: int,
                      progress: bool = True) -> dict[str, tuple[int, int]]:
    """Write out_dir/train.bin and val.bin; returns {split: (tokens, documents)}."""
    from tqdm import tqdm

    n_docs = len(ds)
    is_val = validation_mask(n_docs, val_fraction, seed)
    per_slice = max(1, min(SLICE_DOCS, n_docs // (16 * num_proc)))  # small corpora: still 16 items per worker
    slices = [(s, min(s + per_slice, n_docs)) for s in range(0, n_docs, per_slice)]
    paths = {name: out_dir / f"{name}.bin" for name in ("train", "val")}
    tmps = {name: p.with_name(p.name + ".tmp") for name, p in paths.items()}
    counts = {name: [0, 0] for name in paths}
    _init_worker(ds, text_column, is_val)
    pool = None
    if num_proc > 1:
        # Forked workers inherit the table, the mask and the built encoding at no cost; spawned
        # ones (where fork is missing) rebuild them.
        if "fork" in mp.get_all_start_methods():
            pool = mp.get_context("fork").Pool(num_proc)
        else:
            pool = mp.get_context("spawn").Pool(num_proc, _init_worker, (ds, text_column, is_val))
        results = pool.imap(_encode_slice, slices)
    else:
        results = map(_encode_slice, slices)
    try:
        with open(tmps["train"], "wb") as f_train, open(tmps["val"], "wb") as f_val:
            for train_ids, val_ids, n_train, n_val in tqdm(results, total=len(slices), desc="tokenizing",
                                                           disable=not progress):
                f_train.write(train_ids.tobytes())
                f_val.write(val_ids.tobytes())
                counts["train"][0] += len(train_ids)
                counts["train"][1] += n_train
                counts["val"][0] += len(val_ids)
                counts["val"][1] += n_val
            for f in (f_train, f_val):
                f.flush()
                os.fsync(f.fileno())
        for name in paths:
            os.replace(tmps[name], paths[name])
    finally:
        if pool is not None:
            pool.terminate()
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
    return {name: (c[0], c[1]) for name, c in counts.items()}


def load_documents(files: list[str], name: str, text_column: str):
    from datasets import load_dataset

    if not files:
        return load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        sys.exit(f"error: input file not found: {missing[0]}")
    kinds = {Path(f).suffix.lower() for f in files}
    if kinds <= {".jsonl", ".json"}:
        builder = "json"
    elif kinds <= {".parquet"}:
        builder = "parquet"
    else:
        sys.exit(f"error: --files must all be .jsonl/.json or all .parquet; got {sorted(kinds)}")
    ds = load_dataset(builder, data_files=files, split="train")
    if text_column not in ds.column_names:
        sys.exit(f"error: the input files have no '{text_column}' column (columns: {ds.column_names})")
    return ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="local .parquet or .jsonl files instead of the download")
    parser.add_argument("--name", default="sample-10BT", help="FineWeb-Edu subset")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--out_dir", default=str(HERE), help="where train.bin/val.bin go")
    parser.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer worker processes")
    parser.add_argument("--val_fraction", type=float, default=0.0005)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if not 0.0 < args.val_fraction < 1.0:
        sys.exit(f"error: --val_fraction must be in (0, 1); got {args.val_fraction}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ds = load_documents(args.files, args.name, args.text_column)
    if len(ds) < 2:
        sys.exit(f"error: need at least 2 documents to make a validation split; got {len(ds)}")
    ds = ds.select_columns([args.text_column])
    counts = tokenize_to_files(ds, args.text_column, out_dir, args.num_proc, args.val_fraction, args.seed)
    for name, (n_tokens, n_docs) in counts.items():
        print(f"{name}.bin: {n_tokens:,} tokens from {n_docs:,} documents")
    write_tokens_meta(out_dir, {"source": args.files or f"HuggingFaceFW/fineweb-edu:{args.name}",
                                "val_fraction": args.val_fraction, "seed": args.seed})


if __name__ == "__main__":
    main()
