"""Write the analysis stimuli (localizer.tsv, pos.tsv, small/localizer.tsv) beside this file.

    python stimuli/generate.py

The procedure and its seeds live in the library module `topolm/stimuli.py`; the output is the same on
every run (the tests regenerate it and compare with the shipped files). Needs wordfreq
(requirements-dev.txt) to check that the nonwords are not English words.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from topolm.stimuli import write_small_localizer, write_stimuli  # noqa: E402


def main() -> None:
    for path in [*write_stimuli(HERE), write_small_localizer(HERE)]:
        print(f"wrote {path} ({sum(1 for line in open(path) if not line.startswith('#')) - 1} rows)")


if __name__ == "__main__":
    main()
