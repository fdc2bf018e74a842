"""Tokenize FineWeb-Edu (`sample-10BT`) into train.bin / val.bin beside this file.

    python data/fineweb/prepare.py                              # download through `datasets`
    python data/fineweb/prepare.py --files shard-*.parquet      # local parquet/jsonl files, offline

Each document is GPT-2 BPE-encoded (tiktoken `gpt2`) with one end-of-text token (50256)
appended; 0.0005 of the documents (seed 42) form the validation split. Token ids are written as
a flat uint16 array. The reference run gave about 9.04B train and 4.43M val tokens (train.bin
about 17 GB).

Design decisions (the code is in topolm/corpus.py)
- The validation documents are exactly those that `datasets`' train_test_split(test_size,
  seed=42, shuffle=True) would pick (the research code's split); both files keep the source
  order, so that the corpus is read front to back in contiguous slices.
- The download goes through topolm/hub.py: the local `datasets` cache first; offline
  (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the Hub unreachable) and not cached, one error line
  within seconds that names --files.
- Local files: only the --text_column is read from each file (other columns may differ between
  files), as exact UTF-8; a missing column, a null, an empty document, an escaped lone surrogate
  ("\\ud83d") or bytes that are not UTF-8 are refused with the file and line (or row) named.
- `--num_proc` forked workers each read their own slices of the memory-mapped Arrow table and
  return uint16 arrays; the parent only appends bytes to the two files, in slice order, so the
  output does not depend on the number of workers. (datasets.map was 8x slower than one
  in-process stream on a 10 MB corpus: process start and Arrow cache writes dominated.)
- Arguments and the split sizes are checked before anything is written; each .bin and meta.json
  is written under a temporary name and renamed when complete, so an interrupted or refused run
  leaves earlier files as they were.
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository's library modules
from topolm.config import cli_main  # noqa: E402
from topolm.corpus import (ArgumentParser, check_split, hub_documents, local_documents, open_fraction,
                           output_folder, positive_int, seed_int, tokenize_to_files)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="local .parquet, .jsonl or .json files instead of the download")
    parser.add_argument("--name", default="sample-10BT", help="FineWeb-Edu subset")
    parser.add_argument("--text_column", default="text", help="the column that holds each document's text")
    parser.add_argument("--out_dir", type=output_folder, default=HERE, help="where train.bin/val.bin go")
    parser.add_argument("--num_proc", type=positive_int, default=max(1, os.cpu_count() or 1),
                        help="tokenizer worker processes (>= 1)")
    parser.add_argument("--val_fraction", type=open_fraction, default=0.0005,
                        help="share of documents in val.bin, strictly between 0 and 1")
    parser.add_argument("--seed", type=seed_int, default=42, help="seed of the validation split")
    args = parser.parse_args(argv)
    if not args.text_column:
        parser.error("--text_column must not be empty")

    if args.files:
        ds = local_documents(args.files, args.text_column)
    else:
        ds = hub_documents(args.name, args.text_column)
    check_split(len(ds), args.val_fraction)
    counts = tokenize_to_files(ds, args.out_dir, args.num_proc, args.val_fraction, args.seed, extra_meta={
        "source": args.files or f"HuggingFaceFW/fineweb-edu:{args.name}", "text_column": args.text_column})
    for name, (n_tokens, n_docs) in counts.items():
        print(f"{name}.bin: {n_tokens:,} tokens from {n_docs:,} documents")


if __name__ == "__main__":
    cli_main(main)
