"""topolm/checkpoint.py is the one reader and writer: every script's checkpoints, old and new, load through it."""
import json

import numpy as np
import pytest
import torch

from topolm.checkpoint import (FORMAT, build_classifier, build_gpt, find_checkpoint, load_checkpoint, load_model,
                               make_payload, save_checkpoint)
from topolm.config import UserError
from conftest import PYTHON, REPO, overrides, run_script, write_pattern_data
from model import GPT, GPTConfig
from positions import random_layout

V1 = REPO / "tests" / "fixtures" / "v1"


def test_v1_checkpoints_written_by_the_earlier_code_load_and_give_the_same_outputs():
    expected = np.load(V1 / "expected.npz")
    ckpt = load_checkpoint(V1 / "train-ckpt-0000002.pt")
    assert ckpt["format"] == FORMAT and ckpt["kind"] == "pretrain"
    assert ckpt["tokenizer"] is None  # vocab 64: token ids only
    assert ckpt["layout"]["permutation"] is True
    gpt = build_gpt(ckpt).eval()
    with torch.no_grad():
        hidden, _ = gpt.encode(torch.from_numpy(expected["ids"]), spatial=False)
        logits = hidden @ gpt.lm_head.weight.T
    # The fixture's logits were computed on another CPU: the weights load bit-exactly, but the kernels' summation
    # order differs between machines by a few float32 ulps (1.5e-8 seen), so equality is to 1e-6.
    np.testing.assert_allclose(logits.numpy(), expected["train_logits"], rtol=0, atol=1e-6)
    # the optimizer and random streams of a v1 checkpoint are still there for a resume
    assert "optimizer" in ckpt and len(ckpt["rng"]) == ckpt["world_size"] == 1

    ft = load_checkpoint(V1 / "finetune-ckpt-best.pt")
    assert ft["kind"] == "finetune" and ft["tokenizer"]["name"] == "gpt2" and ft["task"]["name"] == "sst2"
    clf = build_classifier(ft).eval()
    with torch.no_grad():
        out, _ = clf(torch.from_numpy(expected["ids_ft"]), torch.tensor([5]), spatial=False)
    np.testing.assert_allclose(out.numpy(), expected["finetune_outputs"], rtol=0, atol=1e-6)


def test_checkpoints_of_train_and_finetune_load_through_the_one_loader(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    run_script([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="r", vocab_size=50304, max_iters=2,
                           eval_interval=2, save_interval=2)])
    path = find_checkpoint(tmp_path / "r")
    gpt, ckpt, found = load_model(tmp_path / "r")
    assert found == path == tmp_path / "r" / "ckpt-0000002.pt"
    assert ckpt["format"] == FORMAT and ckpt["kind"] == "pretrain" and ckpt["iter_num"] == 2
    assert ckpt["tokenizer"] == {"name": "gpt2", "n_vocab": 50257}
    assert ckpt["layout"] == {"permutation": True, "source": "random(seed=1337)"}
    assert not gpt.training

    glue = tmp_path / "glue" / "sst2"
    glue.mkdir(parents=True)
    rows = [{"sentence": w, "label": i % 2} for i, w in enumerate(["good film", "bad film"] * 8)]
    for split in ("train", "validation"):
        (glue / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script([PYTHON, "finetune.py", "finetune_glue.yaml", f"ckpt={tmp_path / 'r'}", "task=sst2",
                f"data_dir={tmp_path / 'glue'}", f"out_dir={tmp_path / 'ft'}", "max_length=16", "batch_size=8",
                "max_iters=2", "device=cpu", "dtype=float32"])
    ft = load_checkpoint(find_checkpoint(tmp_path / "ft" / "sst2"))
    assert ft["kind"] == "finetune" and ft["task"]["n_outputs"] == 2 and ft["pretrained"]["path"] == str(path)
    assert ft["tokenizer"] == ckpt["tokenizer"] and ft["layout"] == ckpt["layout"]
    backbone, _, _ = load_model(tmp_path / "ft" / "sst2")  # a finetuned folder gives its backbone
    assert torch.equal(backbone.sheet.unit_coords, gpt.sheet.unit_coords)
    proc = run_script([PYTHON, "sample.py", f"ckpt={tmp_path / 'ft' / 'sst2'}", "num_samples=1", "max_new_tokens=3"])
    assert proc.stdout.startswith("# samples from")


def tiny_gpt():
    cfg = GPTConfig(n_layer=1, n_head=1, n_embed=9, block_size=8, vocab_size=32, radius=2, neighborhoods_per_batch=1)
    return GPT(cfg, random_layout(2, 9, seed=3))


def test_payload_round_trip_and_atomic_write(tmp_path):
    gpt = tiny_gpt()
    payload = make_payload(gpt, kind="pretrain", config={"note": "x"}, iter_num=7, tokenizer=None, layout_source="test")
    save_checkpoint(payload, tmp_path / "ckpt-0000007.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000007.pt"]  # no temporary file left
    back = load_checkpoint(tmp_path / "ckpt-0000007.pt")
    assert back["iter_num"] == 7 and back["config"] == {"note": "x"}
    rebuilt = build_gpt(back)
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), rebuilt.state_dict().values()))
    with pytest.raises(ValueError, match="kind must be one of"):
        make_payload(gpt, kind="other", config={}, iter_num=0, tokenizer=None, layout_source="")


class Foreign:  # a pickled class: weights_only loading refuses to run its code
    pass


def test_unknown_formats_and_foreign_files_are_refused(tmp_path):
    torch.save({"format": "topolm-ckpt-v99", "model": {}}, tmp_path / "future.pt")
    with pytest.raises(UserError, match=r"format 'topolm-ckpt-v99'; readable: topolm-ckpt-v2, topolm-ckpt-v1"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"model": {}, "model_args": {}}, tmp_path / "untagged.pt")
    with pytest.raises(UserError, match="format None"):
        load_checkpoint(tmp_path / "untagged.pt")

    torch.save({"x": Foreign()}, tmp_path / "pickle.pt")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")
