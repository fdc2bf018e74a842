"""The catalogue of bad inputs: each refused with one clear line before any work is lost."""
import json

import numpy as np
import pytest
import torch

import train
from topolm import training
from topolm.config import UserError, load_config
from topolm.distributed import Dist
from conftest import PYTHON, overrides, read_checkpoint, run_in_process, run_script, write_pattern_data
from topolm.position_sets import save_positions
from positions import random_layout


def args_for(data, out, **kw):
    return ["train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(out), run_name="r", **kw)]


def refuse(argv, match):
    with pytest.raises(UserError, match=match):
        train.main(argv)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = run_script([PYTHON, "train.py", "train_shakespeare.yaml", "batch_sise=4"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown config key 'batch_sise'; did you mean 'batch_size'? "
                                   "`python train.py help` lists every key")
    assert proc.stdout == ""
    proc = run_in_process([PYTHON, "train.py", "train_shakespeare.yaml", "batch_size=four"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: bad value for config key 'batch_size'")


@pytest.mark.parametrize("kw,match", [
    (dict(alpha="high"), "bad value for config key 'alpha'"),
    (dict(compile="maybe"), "bad value for config key 'compile'"),
    (dict(sheet_rows=5), "sheet_rows=5 does not divide n_embed=36"),
    (dict(n_embed=50, radius=4), "radius=4 is too large for a 5x10 grid"),
    (dict(alpha_sites="[1,0]"), "alpha_sites has 2 values; the model's 2 layers have 4 sites"),
    (dict(alpha_sites="[1,0,1,-1]"), "every weight must be a finite number >= 0"),
    (dict(alpha_sites="[1,0,1,0]", alpha_mlp=0), "leave alpha_attn and alpha_mlp out"),
    (dict(alpha_mlp=-1), "alpha_mlp=-1.0 must be a finite number >= 0"),
    (dict(alpha_schedule="linear"), "alpha_schedule=linear needs alpha_warmup_iters >= 1"),
    (dict(alpha_schedule="cosine", alpha_warmup_iters=5, alpha_decay_iters=5), "needs alpha_decay_iters > "),
    (dict(alpha_final=2), r"alpha_final=2.0 must be in \[0, 1\]"),
    (dict(n_head=5), "n_embed=36 is not divisible by n_head=5"),
    (dict(radius=4), "radius=4 is too large for a 6x6 grid"),
    (dict(radius=0), "radius=0 must be >= 1"),
    (dict(neighborhoods_per_batch=17), "neighborhoods_per_batch=17 exceeds the 16 neighborhoods"),
    (dict(init_from="gpt2"), "checkpoint not found: gpt2"),  # neither scratch nor resume: a path
    (dict(dtype="fp8"), "dtype must be one of"),
])
def test_bad_config_values(tmp_path, kw, match):
    refuse(args_for(tmp_path, tmp_path, **kw), match)


def test_config_file_not_found():
    refuse(["no_such_config.yaml"], "config file not found")
    with pytest.raises(UserError, match="unknown config key 'nope'"):
        load_config(train.TrainConfig, ["nope=1"])


def test_data_problems(tmp_path):
    refuse(args_for(tmp_path / "missing", tmp_path), "data file not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.bin").write_bytes(b"")
    refuse(args_for(empty, tmp_path), "holds 0 tokens; block_size=32 needs at least 33")
    short = tmp_path / "short"
    short.mkdir()
    np.arange(20, dtype=np.uint16).tofile(short / "train.bin")
    refuse(args_for(short, tmp_path), "holds 20 tokens")
    big = write_pattern_data(tmp_path / "big", vocab=64)
    ids = np.fromfile(big / "val.bin", dtype=np.uint16)
    ids[7] = 60000
    ids.tofile(big / "val.bin")
    refuse(args_for(big, tmp_path), "holds token id 60000 >= vocab_size=64")


def test_position_set_problems(tiny_data, tmp_path):
    refuse(args_for(tiny_data, tmp_path, position_dir=str(tmp_path / "nope")), "position set not found")
    save_positions(tmp_path / "other", random_layout(6, 36, seed=0), {"layout": "random"})
    refuse(args_for(tiny_data, tmp_path, position_dir=str(tmp_path / "other")), "n_layer=3.*needs n_layer=2")
    save_positions(tmp_path / "wide", random_layout(4, 49, seed=0), {"layout": "random"})
    refuse(args_for(tiny_data, tmp_path, position_dir=str(tmp_path / "wide")), "n_embed=49.*needs n_layer=2, n_embed=36")


def test_resume_problems(tiny_data, tmp_path):
    refuse(args_for(tiny_data, tmp_path, init_from="resume"), "init_from=resume but .* holds no checkpoint")
    train.main(args_for(tiny_data, tmp_path, max_iters=2))
    refuse(args_for(tiny_data, tmp_path, max_iters=4), "already holds checkpoints; use init_from=resume")
    refuse(args_for(tiny_data, tmp_path, init_from="resume", n_layer=3),
           r"made for another architecture: n_layer=2 in checkpoint vs 3 now")
    ckpt = tmp_path / "r" / "ckpt-0000002.pt"
    before = ckpt.read_bytes()
    corrupt = tmp_path / "r" / "ckpt-0000003.pt"
    corrupt.write_bytes(before[: len(before) // 2])
    refuse(args_for(tiny_data, tmp_path, init_from="resume", max_iters=4), "cannot load checkpoint")
    assert ckpt.read_bytes() == before  # the good checkpoint is untouched


def test_accumulation_must_split_over_ranks(tiny_data, tmp_path):
    cfg = load_config(train.TrainConfig, args_for(tiny_data, tmp_path, gradient_accumulation_steps=3))
    with pytest.raises(UserError, match="gradient_accumulation_steps=3 is not divisible by the 2 ranks"):
        train.train(cfg, Dist(rank=0, local_rank=0, world_size=2, device="cpu", ddp=True))


def test_bf16_refused_without_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="no bf16 support"):
        training.resolve_dtype("bfloat16", "cuda")


def _nan_at(monkeypatch, iteration, component):
    """Optimizer step `iteration` sees a NaN task loss or an infinite spatial loss at site 1 (layer.0.mlp),
    injected through the loop's seam for faults, training.Optimization.forward."""
    original = training.Optimization.forward

    def forward(self, it, micro_step):
        loss, stats = original(self, it, micro_step)
        if it != iteration:
            return loss, stats
        if component == "task":
            return loss * float("nan"), {**stats, "task": stats["task"] * float("nan")}
        sites = stats["sites"].clone()
        sites[1] = float("inf")
        return loss + float("inf"), {**stats, "spatial": stats["spatial"] + float("inf"), "sites": sites}

    monkeypatch.setattr(training.Optimization, "forward", forward)


def test_nonfinite_loss_stops_naming_iteration_and_site(tiny_data, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3, "site")
    with pytest.raises(UserError, match=r"non-finite loss at iteration 3: spatial site layer.0.mlp"):
        train.main(args_for(tiny_data, tmp_path, save_interval=2, max_iters=10))
    assert (tmp_path / "r" / "ckpt-0000002.pt").is_file()


def test_nonfinite_loss_skip(tiny_data, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3, "task")
    train.main(args_for(tiny_data, tmp_path, max_iters=6, nonfinite="skip"))
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    skipped = [r["iter"] for r in log if r["event"] == "train" and r["skipped"]]
    assert skipped == [3]
    final = read_checkpoint(tmp_path / "r" / "ckpt-0000006.pt")
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


def test_string_overrides_stay_text():
    from sample import SampleConfig
    assert load_config(SampleConfig, ["ckpt=out/run", "start=ROMEO:"]).start == "ROMEO:"
    cfg = load_config(train.TrainConfig, ["position_dir=''", "run_name=123"])
    assert cfg.position_dir == "" and cfg.run_name == "123"
