"""Score a checkpoint on BLiMP: accuracy per paradigm, per phenomenon and overall.

    python blimp.py ckpt=out/<run>                                  # all 67 paradigms from the Hub (nyu-mll/blimp)
    python blimp.py ckpt=out/<run> paradigms=anaphor_gender_agreement,wh_island
    python blimp.py ckpt=out/<run> data_dir=path/to/blimp/data      # offline: <paradigm>.jsonl files

Each sentence is scored as its total log-probability given a leading <|endoftext|> (as written, or
with leading_space=true as " " + sentence, lm-eval's convention); a pair is
correct when the grammatical sentence scores higher (topolm/blimp.py). A pair holding a token outside
a restricted output vocabulary (output_vocab=corpus) is not scorable: counted, and left out of the
accuracy. Prints a table and writes the results as JSON (`out`, default `<checkpoint>.blimp.json`
beside the checkpoint).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


from topolm.checkpoint import load_model, require_gpt2_tokenizer, require_positions
from topolm.config import cli_main, load_config, resolve_device
from topolm.files import atomic_write, output_file, require_writable
from topolm.provenance import provenance
from topolm.signals import exit_on_stop, held
from topolm.tokenizer import gpt2_encoding
from topolm.blimp import BlimpKeys, blimp_table, load_blimp_hub, load_blimp_local, score_blimp


@dataclass
class BlimpConfig(BlimpKeys):
    """blimp.py's keys: its own below; ckpt, device, data_dir, paradigms, batch_size and leading_space from
    topolm.blimp.BlimpKeys."""
    out: str = ""
    """JSON results file; empty writes <checkpoint file>.blimp.json beside the checkpoint; a folder (a value
    ending in / or an existing folder) gets that file name inside it."""
    save_pairs: bool = False
    """Also write each pair's log-probabilities (lp_good, lp_bad) into the JSON."""


def finite_or_none(values) -> list:
    """Numbers for JSON: -inf (probability 0 under a restricted output vocabulary) becomes null."""
    return [float(v) if math.isfinite(v) else None for v in values]


def main(argv: list[str]) -> None:
    exit_on_stop()
    cfg: BlimpConfig = load_config(BlimpConfig, argv)
    device = resolve_device(cfg.device)
    model, ckpt, path = load_model(cfg.ckpt, device)
    require_positions(ckpt, path, "BLiMP")
    require_gpt2_tokenizer(ckpt, path, "BLiMP")
    out = output_file(cfg.out, path.name + ".blimp.json", path.parent)
    require_writable(out.parent)
    pairs = load_blimp_local(Path(cfg.data_dir), cfg.paradigms) if cfg.data_dir else load_blimp_hub(cfg.paradigms)
    results = score_blimp(model, pairs, gpt2_encoding(), cfg.batch_size, device, leading_space=cfg.leading_space)
    lp_good, lp_bad, scorable = results.pop("lp_good"), results.pop("lp_bad"), results.pop("scorable")
    print(blimp_table(results))
    record = {"checkpoint": str(path), "provenance": provenance(path, ckpt, model), "data": cfg.data_dir or "nyu-mll/blimp",
              "config": asdict(cfg), **results}
    if cfg.save_pairs:
        record["pairs"] = {"paradigm": pairs.paradigm, "lp_good": finite_or_none(lp_good),
                           "lp_bad": finite_or_none(lp_bad), "scorable": scorable.tolist()}
    with held(f"{out} was written in full"):  # a stop during the write lets it finish
        atomic_write(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
