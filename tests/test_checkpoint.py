"""topolm/checkpoint.py is the one reader and writer: every script's checkpoints, old and new, load through it."""
import json

import numpy as np
import pytest
import torch

from topolm.checkpoint import (FORMAT, build_classifier, build_gpt, find_checkpoint, load_checkpoint, load_model,
                               make_payload, save_checkpoint)
from topolm.config import UserError
from conftest import PYTHON, REPO, overrides, run_in_process, write_pattern_data
from model import GPT, GPTConfig
from positions import random_layout

FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_checkpoints_written_by_earlier_formats_load_and_give_the_same_outputs(version):
    """tests/fixtures/<version>/ holds a train.py and a finetune.py checkpoint written in that format, with
    the outputs that code computed from them; both load through the one loader, migrated to the current format."""
    folder = FIXTURES / version
    expected = np.load(folder / "expected.npz")
    ckpt = load_checkpoint(folder / "train-ckpt-0000002.pt")
    assert ckpt["format"] == FORMAT and ckpt["kind"] == "pretrain"
    assert ckpt["tokenizer"] is None  # vocab 64: token ids only
    assert ckpt["layout"]["permutation"] is True
    # the dataset key as the run gave it; the folder it resolved to was not recorded then
    assert ckpt["data"] == {"dataset": ckpt["config"]["dataset"], "path": None, "tokenizer": None}
    gpt = build_gpt(ckpt).eval()
    with torch.no_grad():
        hidden, _ = gpt.encode(torch.from_numpy(expected["ids"]), spatial=False)
        logits = hidden @ gpt.lm_head.weight.T
    # The fixture's logits were computed on another CPU: the weights load bit-exactly, but the kernels' summation
    # order differs between machines by a few float32 ulps (1.5e-8 seen), so equality is to 1e-6.
    np.testing.assert_allclose(logits.numpy(), expected["train_logits"], rtol=0, atol=1e-6)
    if "units" in expected:  # the unit positions too: each site's spatial loss on the recorded neighborhoods
        ids = torch.from_numpy(expected["ids"])
        with torch.no_grad():
            _, losses = gpt(ids, ids, units=torch.from_numpy(expected["units"]))
        np.testing.assert_allclose(losses.per_site.numpy(), expected["train_per_site"], rtol=0, atol=1e-6)
    # the optimizer and random streams of the checkpoint are still there for a resume
    assert "optimizer" in ckpt and len(ckpt["rng"]) == ckpt["world_size"] == 1

    ft = load_checkpoint(folder / "finetune-ckpt-best.pt")
    assert ft["kind"] == "finetune" and ft["tokenizer"]["name"] == "gpt2" and ft["task"]["name"] == "sst2"
    assert ft["data"] is None  # its backbone's data field did not exist yet
    clf = build_classifier(ft).eval()
    with torch.no_grad():
        out, _ = clf(torch.from_numpy(expected["ids_ft"]), torch.tensor([5]), spatial=False)
    np.testing.assert_allclose(out.numpy(), expected["finetune_outputs"], rtol=0, atol=1e-6)


def test_checkpoints_of_train_and_finetune_load_through_the_one_loader(tmp_path):
    data = write_pattern_data(tmp_path / "data")
    run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                *overrides(dataset=str(data), out_dir=str(tmp_path), run_name="r", vocab_size=50304, max_iters=2,
                           eval_interval=2, save_interval=2)])
    path = find_checkpoint(tmp_path / "r")
    gpt, ckpt, found = load_model(tmp_path / "r")
    assert found == path == tmp_path / "r" / "ckpt-0000002.pt"
    assert ckpt["format"] == FORMAT and ckpt["kind"] == "pretrain" and ckpt["iter_num"] == 2
    assert ckpt["tokenizer"] == {"name": "gpt2", "n_vocab": 50257}
    assert ckpt["layout"] == {"permutation": True, "source": "random(seed=1337)"}
    assert ckpt["data"] == {"dataset": str(data), "path": str(data.resolve()), "tokenizer": "gpt2"}
    assert not gpt.training

    glue = tmp_path / "glue" / "sst2"
    glue.mkdir(parents=True)
    rows = [{"sentence": w, "label": i % 2} for i, w in enumerate(["good film", "bad film"] * 8)]
    for split in ("train", "validation"):
        (glue / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_in_process([PYTHON, "finetune.py", "finetune_glue.yaml", f"ckpt={tmp_path / 'r'}", "task=sst2",
                f"data_dir={tmp_path / 'glue'}", f"out_dir={tmp_path / 'ft'}", "max_length=16", "batch_size=8",
                "max_iters=2", "device=cpu", "dtype=float32"])
    ft = load_checkpoint(find_checkpoint(tmp_path / "ft" / "sst2"))
    assert ft["kind"] == "finetune" and ft["task"]["n_outputs"] == 2 and ft["pretrained"]["path"] == str(path)
    assert ft["tokenizer"] == ckpt["tokenizer"] and ft["layout"] == ckpt["layout"]
    assert ft["data"] == ckpt["data"]  # the backbone's training text, for the analysis
    backbone, _, _ = load_model(tmp_path / "ft" / "sst2")  # a finetuned folder gives its backbone
    assert torch.equal(backbone.sheet.unit_coords, gpt.sheet.unit_coords)
    proc = run_in_process([PYTHON, "sample.py", f"ckpt={tmp_path / 'ft' / 'sst2'}", "num_samples=1", "max_new_tokens=3"])
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


def test_run_checkpoints_decide_write_prune_and_restore(tmp_path):
    from topolm.distributed import Dist
    from topolm.training import Optimization, RunCheckpoints
    from topolm.config import LoopConfig

    d = Dist(0, 0, 1, "cpu", False)
    gpt = tiny_gpt()
    opt = Optimization(gpt, LoopConfig(device="cpu", dtype="float32"), d, "float32")
    generators = {"batch": torch.Generator().manual_seed(5)}
    ckpts = RunCheckpoints(tmp_path, d, opt, generators, interval=10, start_iter=20, last_iter=45, keep_last=2,
                           always=False)
    # every interval (only after an improvement, with always=False) and after the last step; never at the start
    assert [it for it in range(19, 46) if ckpts.due(it, improved=True)] == [30, 40, 45]
    assert [it for it in range(19, 46) if ckpts.due(it, improved=False)] == [45]

    x = torch.randint(0, 32, (2, 8))
    _, losses = gpt(x, x, units=gpt.sample_units(torch.Generator().manual_seed(0)))
    losses.total.backward()
    opt.optimizer.step()
    for it in (30, 40, 45):
        ckpts.save(tmp_path / f"ckpt-{it:07d}.pt", make_payload(gpt, kind="pretrain", config={}, iter_num=it,
                                                                tokenizer=None, layout_source="t"), best_val_loss=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000040.pt", "ckpt-0000045.pt"]  # keep_last=2
    ckpts.save(tmp_path / "best.pt", make_payload(gpt, kind="pretrain", config={}, iter_num=45, tokenizer=None,
                                                  layout_source="t"), resumable=False)
    saved, best = load_checkpoint(tmp_path / "ckpt-0000045.pt"), load_checkpoint(tmp_path / "best.pt")
    assert saved["best_val_loss"] == 1.5 and saved["world_size"] == 1 and saved["optimizer"]["state"]
    assert "optimizer" not in best and "rng" in best  # not resumable, but with the random streams

    expected = torch.randint(0, 1000, (3,), generator=generators["batch"])
    generators["batch"].manual_seed(99)
    fresh = Optimization(tiny_gpt(), LoopConfig(device="cpu", dtype="float32"), d, "float32")
    RunCheckpoints(tmp_path, d, fresh, generators, interval=10, start_iter=45, last_iter=45).restore(saved, 0, "x")
    assert torch.equal(torch.randint(0, 1000, (3,), generator=generators["batch"]), expected)
    state, restored = opt.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], restored[k]["exp_avg"]) for k in state)


def test_without_wandb_the_loops_log_to_a_null_run():
    from topolm.config import LoopConfig
    from topolm.training import NullRun, start_wandb

    cfg = LoopConfig(wandb_log=True)
    for run in (start_wandb(LoopConfig(), "unused", "n", None), start_wandb(cfg, "unused", "n", None, enabled=False)):
        assert isinstance(run, NullRun) and run.id is None
        run.log({"loss": 1.0}, step=3)
        run.finish()


def test_only_a_plain_dataset_name_of_a_foreign_config_is_kept():
    from topolm.checkpoint import plain_dataset

    assert plain_dataset({"dataset": "fineweb"}) == "fineweb"
    assert plain_dataset({"dataset": "data/owt-2.1"}) == "data/owt-2.1"
    for config in ({"dataset": "'fineweb'"}, {"dataset": "os.environ['D']"}, {"dataset": 3}, {}, None, "text"):
        assert plain_dataset(config) is None, config


class Foreign:  # a pickled class: weights_only loading refuses to run its code
    pass


def test_unknown_formats_and_foreign_files_are_refused(tmp_path):
    torch.save({"format": "topolm-ckpt-v99", "model": {}}, tmp_path / "future.pt")
    with pytest.raises(UserError, match=r"format 'topolm-ckpt-v99'; readable: topolm-ckpt-v3, topolm-ckpt-v1, topolm-ckpt-v2"):
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
