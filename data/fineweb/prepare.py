"""Tokenize FineWeb-Edu (`sample-10BT`) into train.bin / val.bin beside this file (SPEC section 5).

    python data/fineweb/prepare.py                              # download through `datasets`
    python data/fineweb/prepare.py --files shard-*.parquet      # local parquet/jsonl files, offline

Each document is GPT-2 BPE-encoded (tiktoken `gpt2`) with one end-of-text token (50256)
appended; 0.0005 of the documents (seed 42) form the validation split. Token ids are written as
a flat uint16 array. Documents are tokenized in `--num_proc` worker processes. The reference
run gave about 9.04B train and 4.43M val tokens (train.bin about 17 GB).
Each .bin is written under a temporary name and renamed when complete.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from common import EOT_TOKEN, gpt2_encoding, write_tokens_meta  # noqa: E402

_ENCODING = None


def tokenize(batch: dict, text_column: str = "text") -> dict:
    """Worker-side: GPT-2 ids of each document plus EOT (the encoding is built once per worker)."""
    global _ENCODING
    if _ENCODING is None:
        _ENCODING = gpt2_encoding()
    ids = _ENCODING.encode_ordinary_batch(batch[text_column], num_threads=1)
    for doc in ids:
        doc.append(EOT_TOKEN)
    return {"ids": ids, "len": [len(doc) for doc in ids]}


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


def write_split(dset, path: Path, desc: str) -> int:
    from tqdm import tqdm

    total = int(np.sum(dset["len"], dtype=np.uint64))
    tmp = path.with_name(path.name + ".tmp")
    arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(max(total, 1),))
    n_shards = max(1, min(1024, len(dset)))
    idx = 0
    for shard in tqdm(range(n_shards), desc=desc):
        batch = dset.shard(num_shards=n_shards, index=shard, contiguous=True).with_format("numpy")
        ids = np.concatenate(batch["ids"]) if len(batch) else np.empty(0, dtype=np.uint16)
        arr[idx:idx + len(ids)] = ids
        idx += len(ids)
    arr.flush()
    del arr
    if total == 0:
        tmp.write_bytes(b"")
    os.replace(tmp, path)
    return total


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
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ds = load_documents(args.files, args.name, args.text_column)
    if len(ds) < 2:
        sys.exit(f"error: need at least 2 documents to make a validation split; got {len(ds)}")
    split = ds.train_test_split(test_size=args.val_fraction, seed=args.seed, shuffle=True)
    split["val"] = split.pop("test")
    tokenized = split.map(
        tokenize, batched=True, batch_size=256, fn_kwargs={"text_column": args.text_column},
        remove_columns=ds.column_names, num_proc=args.num_proc if args.num_proc > 1 else None, desc="tokenizing",
    )
    for name, dset in tokenized.items():
        n = write_split(dset, out_dir / f"{name}.bin", f"writing {name}.bin")
        print(f"{name}.bin: {n:,} tokens from {len(dset):,} documents")
    write_tokens_meta(out_dir, {"source": args.files or f"HuggingFaceFW/fineweb-edu:{args.name}",
                                "val_fraction": args.val_fraction, "seed": args.seed})


if __name__ == "__main__":
    main()
