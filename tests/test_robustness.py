"""Faults of nanoGPT-style trainers that users have reported, each as the kind it stands for:
every numeric key's domain, contradictory keys, wandb without a login, a checkpoint's vocabulary,
re-seeding on another rank count, fp16 steps the scaler skipped, leftovers of interrupted writes,
refusals that name their fix, text read exactly, and an overwrite that replaces every output."""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import finetune
from topolm import glue
import init_pos
import sample
import train
from topolm import training
from topolm.checkpoint import GPT2_TOKENIZER, build_gpt, make_payload, save_checkpoint
from topolm.config import SEED_MAX, UserError, load_config
from topolm.distributed import Dist
from topolm.files import read_text
from conftest import (PYTHON, one_error_line, overrides, read_checkpoint, read_log, run_in_process, run_script, torchrun,
                      write_pattern_data)
from glue_summary import SummaryConfig
from model import GPT, GPTConfig

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pattern_data(tmp_path_factory.mktemp("data"))


def train_argv(data, out, **kw):
    return ["train_shakespeare.yaml", *overrides(dataset=str(data), out_dir=str(out), run_name="r", **kw)]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny train.py run on token ids only (vocab_size=64), with the largest seed there is, so every
    offset the code adds to the seed is exercised: checkpoints at iterations 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    train.main(train_argv(data, out, seed=SEED_MAX, max_iters=4, save_interval=2))
    return out / "r"


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A tiny GPT with GPT-2's vocabulary, written in the checkpoint format (untrained: enough for text to meet it)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embed=36, block_size=32, vocab_size=50304, radius=2,
                        neighborhoods_per_batch=2, alpha=1.0))
    path = tmp_path_factory.mktemp("gpt2") / "ckpt-0000000.pt"
    save_checkpoint(make_payload(gpt, kind="pretrain", config={}, iter_num=0, tokenizer=dict(GPT2_TOKENIZER),
                                 layout_source="random"), path)
    return path


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("validation", 12)):
        rows = [{"sentence": " ".join(rng.choice(["good", "bad", "film", "plot"], size=4)), "label": int(i % 2)}
                for i in range(n)]
        (root / "sst2").mkdir(exist_ok=True)
        (root / "sst2" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def finetune_argv(ckpt, data_dir, out, **kw):
    base = dict(ckpt=ckpt, data_dir=data_dir, out_dir=out, task="sst2", max_length=16, batch_size=8,
                learning_rate=1e-3, max_iters=2, eval_interval=2, device="cpu", dtype="float32", log_interval=1)
    return ["finetune_glue.yaml", *[f"{k}={v}" for k, v in {**base, **kw}.items()]]


# ----------------------------------------------------------------------------- 1. every numeric key's domain

SYSTEM = {"seed": [-1, SEED_MAX + 1]}
OPTIMIZER = {"learning_rate": [0, -1e-3, NAN, INF], "weight_decay": [-0.1, NAN, INF], "beta1": [1.0, -0.1],
             "beta2": [1.0, NAN], "grad_clip": [-1, NAN], "warmup_iters": [-1], "lr_decay_iters": [-1],
             "min_lr": [-1e-5, NAN, INF]}
LOOP = {**SYSTEM, **OPTIMIZER, "batch_size": [0], "gradient_accumulation_steps": [0], "log_interval": [0]}
SHEET = {"n_layer": [0], "n_head": [0, -2], "n_embed": [0], "sheet_rows": [-1, 5], "vocab_size": [0]}
MODEL = {**SHEET, "block_size": [0], "dropout": [1.0, -0.1, NAN], "radius": [0, 99],
         "neighborhoods_per_batch": [0, 10**6], "alpha": [-1, NAN, INF], "n_output_ids": [-1, 10**6]}

# (config class, the arguments it loads with, {numeric key: out-of-domain values})
DOMAINS = [
    (train.TrainConfig, ["train_shakespeare.yaml"],
     {**MODEL, **LOOP, "eval_interval": [0], "eval_iters": [0], "save_interval": [0], "keep_last": [-1],
      "max_iters": [-1], "alpha_warmup_iters": [-1], "alpha_decay_iters": [-1], "alpha_final": [-0.1, 1.5, NAN],
      "keep_every": [-1], "topography_heldout_tokens": [15], "topography_null_shuffles": [1],
      "topography_seed": [-1, SEED_MAX + 1], "topography_image_interval": [-1]}),
    (finetune.FinetuneConfig, ["finetune_glue.yaml", "ckpt=somewhere"],
     {**LOOP, "max_length": [0], "max_train_examples": [-1], "dropout": [1.0, NAN], "alpha_scale": [-1, NAN, INF],
      "max_epochs": [0], "max_iters": [-1], "eval_interval": [-1], "patience": [0]}),
    (init_pos.InitPosConfig, ["init_pos.yaml"],
     {**SHEET, **SYSTEM, "radius": [0, -3], "n_neighborhoods": [0], "local_steps": [0], "n_tokens": [0],
      "block_size": [0], "model_block_size": [0]}),
    (sample.SampleConfig, ["ckpt=somewhere"],
     {**SYSTEM, "num_samples": [0], "max_new_tokens": [-1], "temperature": [0, -1, NAN, INF], "top_k": [-1]}),
    (SummaryConfig, [], {}),
]
CASES = [pytest.param(cls, base, key, value, id=f"{cls.__name__}-{key}={value}")
         for cls, base, table in DOMAINS for key, values in table.items() for value in values]


def numeric_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type in (int, float, "int", "float")}


@pytest.mark.parametrize("cls,base,table", [pytest.param(*d, id=d[0].__name__) for d in DOMAINS])
def test_the_domain_table_covers_every_numeric_key(cls, base, table):
    # a key added without a row here fails: its domain must be decided and checked
    assert set(table) == numeric_keys(cls)
    load_config(cls, base)  # and the arguments the table starts from are themselves accepted


@pytest.mark.parametrize("cls,base,key,value", CASES)
def test_out_of_domain_value_is_refused_naming_the_key(cls, base, key, value):
    with pytest.raises(UserError) as e:
        load_config(cls, [*base, f"{key}={value}"])
    assert re.search(rf"\b{key}\b", str(e.value)), str(e.value)


@pytest.mark.parametrize("key,value", [("radius", 1), ("n_neighborhoods", 10**6), ("n_tokens", 64),
                                       ("block_size", 2048)])
def test_swap_search_keys_are_checked_against_the_grid(key, value):
    with pytest.raises(UserError, match=rf"\b{key}={value}\b"):
        load_config(init_pos.InitPosConfig, ["init_pos.yaml", "layout=swapopt", f"{key}={value}"])


def test_out_of_domain_seed_on_the_command_line_is_one_error_line():
    proc = run_in_process([PYTHON, "train.py", "train_shakespeare.yaml", "position_dir=''", "seed=-1"], check=False)
    one_error_line(proc, f"seed=-1 must be in [0, {SEED_MAX}]")
    assert proc.stdout == ""
    proc = run_in_process([PYTHON, "init_pos.py", "config/init_pos.yaml", "seed=-1"], check=False)
    one_error_line(proc, f"seed=-1 must be in [0, {SEED_MAX}]")


def test_the_largest_seed_works_with_every_offset(run):
    # the module's run trained, evaluated and drew its layout from seed=2**32-1
    assert read_checkpoint(run / "ckpt-0000004.pt")["config"]["seed"] == SEED_MAX
    for stream in training.STREAMS:
        s = training.stream_seed(SEED_MAX, stream, rank=4095, iteration=10**12)
        assert 0 <= s < 2**63
        torch.Generator().manual_seed(s)
        np.random.default_rng(s)


# ----------------------------------------------------------------------------- 2. contradictory keys


@pytest.mark.parametrize("args,keys", [
    (["warmup_iters=500", "lr_decay_iters=300"], ["warmup_iters=500", "lr_decay_iters=300"]),
    (["min_lr=0.01", "learning_rate=0.002"], ["min_lr=0.01", "learning_rate=0.002"]),
])
def test_contradictory_schedule_is_refused_naming_both_keys(args, keys):
    for cls, base in ((train.TrainConfig, ["train_shakespeare.yaml"]),
                      (finetune.FinetuneConfig, ["finetune_glue.yaml", "ckpt=x", "decay_lr=true"])):
        with pytest.raises(UserError) as e:
            load_config(cls, [*base, *args])
        assert all(k in str(e.value) for k in keys), str(e.value)
        load_config(cls, [*base, *args, "decay_lr=false"])  # a constant rate uses neither: nothing to refuse


def test_one_device_check_for_every_command():
    import ablate
    import analyze
    import blimp
    import export_hf
    from topolm.config import resolve_device
    trainers = [(train.TrainConfig, ["train_shakespeare.yaml"]), (finetune.FinetuneConfig, ["finetune_glue.yaml", "ckpt=x"])]
    inference = [(sample.SampleConfig, ["ckpt=x"]), (analyze.AnalyzeConfig, ["ckpt=x"]), (blimp.BlimpConfig, ["ckpt=x"]),
                 (ablate.AblateConfig, ["ckpt=x", "units=u.npz"])]
    for cls, base in trainers + inference:
        for device in ("auto", "cpu", "cuda", "cuda:1"):
            assert load_config(cls, [*base, f"device={device}"]).device == device
        for device in ("gpu", "cuda:", "cuda:-1", "CPU", "cuda0"):
            with pytest.raises(UserError, match=rf"^device={re.escape(device)} is not a device: use one of auto, cpu, "
                                                rf"cuda.* \(e.g. device=cpu\)"):
                load_config(cls, [*base, f"device={device}"])
    for cls, base in inference:
        assert load_config(cls, [*base, "device=mps"]).device == "mps"
    for cls, base in trainers:
        with pytest.raises(UserError, match=r"^device=mps is taken by the inference commands only \(sample.py"):
            load_config(cls, [*base, "device=mps"])
    for cls, base in inference + [(export_hf.ExportConfig, ["out=o"]), (finetune.FinetuneConfig, ["finetune_glue.yaml"])]:
        with pytest.raises(UserError, match=r"^ckpt= is required: a checkpoint file or run folder"):
            load_config(cls, [a for a in base if not a.startswith("ckpt=")] + ["ckpt="])
    assert load_config(init_pos.InitPosConfig, ["init_pos.yaml"]).ckpt == ""  # optional there
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(UserError, match=r"^device=cuda:1 but no CUDA device is available; use device=cpu"):
            resolve_device("cuda:1")


def test_other_contradictions_are_refused_naming_both_keys():
    with pytest.raises(UserError, match="init_from=resume .* overwrite=true"):
        load_config(finetune.FinetuneConfig, ["finetune_glue.yaml", "ckpt=x", "init_from=resume", "overwrite=true"])
    with pytest.raises(UserError, match="ckpt=out/r is used by layout=swapopt only"):
        load_config(init_pos.InitPosConfig, ["init_pos.yaml", "layout=random", "ckpt=out/r"])


def test_eval_only_from_scratch_warns_and_a_new_run_replaces_its_log(data, tmp_path, capsys):
    train.main(train_argv(data, tmp_path, eval_only="true"))
    out = capsys.readouterr().out
    assert out.count("warning: eval_only=true with init_from=scratch evaluates a freshly initialised model") == 1
    assert [r["event"] for r in read_log(tmp_path / "r")] == ["start", "eval"]
    # no checkpoint was saved, so a new run in that folder is allowed; its log holds that run only
    train.main(train_argv(data, tmp_path, max_iters=1))
    events = [r["event"] for r in read_log(tmp_path / "r")]
    assert events.count("start") == 1 and events[-1] == "end"
    assert "warning: eval_only" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3. wandb without a login


def test_wandb_without_login_logs_offline_inside_the_run_folder(data, tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    argv = [PYTHON, str(train.__file__), *train_argv(data, tmp_path / "out", max_iters=2, eval_iters=1,
                                                     wandb_log="true")]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "r"
    notice = [line for line in proc.stdout.splitlines() if line.startswith("wandb: no login found")]
    assert notice == [f"wandb: no login found; logging offline into {run_dir / 'wandb'} (upload later with "
                      f"`wandb sync`)"]
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    ckpt = read_checkpoint(run_dir / "ckpt-0000002.pt")
    assert offline[0].name == f"run-{ckpt['wandb_id']}.wandb"  # a resume continues the same wandb run
    assert list(home.rglob("*")) == [] and list(cwd.rglob("*")) == []  # nothing outside the run folder


# ----------------------------------------------------------------------------- 4. the checkpoint's vocabulary


def test_sampling_a_model_without_gpt2_vocabulary_is_one_error_line(run):
    proc = run_in_process([PYTHON, "sample.py", f"ckpt={run}", "start=ROMEO:", "max_new_tokens=5"], check=False)
    one_error_line(proc, "ckpt-0000004.pt", "vocab_size=64", "needs the GPT-2 vocabulary (at least 50257)",
                   "use a checkpoint trained on GPT-2 token ids with vocab_size >= 50257")
    assert read_checkpoint(run / "ckpt-0000004.pt")["tokenizer"] is None  # recorded by train.py


# ----------------------------------------------------------------------------- 6. re-seeding on another rank count


def first_step_loss(run_dir, ckpt_name, cfg, batch_seed, nbhd_seed):
    """task + spatial loss of one rank's first micro-step from a checkpoint, with its streams at these seeds."""
    gpt = build_gpt(read_checkpoint(run_dir / ckpt_name))
    batches = train.Batches(Path(cfg.dataset) / "train.bin", cfg, "cpu")
    x, y = batches.get(torch.Generator().manual_seed(batch_seed))
    with torch.no_grad():
        _, losses = gpt(x, y, units=gpt.sample_units(torch.Generator().manual_seed(nbhd_seed)))
    return float(losses.task) + float(losses.spatial)


@pytest.mark.torchrun
def test_resuming_on_more_ranks_continues_with_new_data(run, data, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    kw = dict(init_from="resume", max_iters=5, backend="gloo", gradient_accumulation_steps=2, seed=SEED_MAX)
    proc = run_script(torchrun(2, "train.py", train_argv(data, tmp_path, **kw)))
    assert "written by 1 ranks, now 2: random streams are re-seeded from the seed, rank and iteration 4" in proc.stdout
    log = read_log(tmp_path / "r")
    assert [r for r in log if r["event"] == "resume"][0]["world_size"] == 2
    logged = [r for r in log if r["event"] == "train" and r["iter"] == 4][0]["loss"]

    cfg = load_config(train.TrainConfig, train_argv(data, tmp_path, **kw))
    seeds = {it: (training.stream_seed(SEED_MAX, "batch", 0, it), training.stream_seed(SEED_MAX, "nbhd", 0, it))
             for it in (0, 4)}
    resumed = first_step_loss(tmp_path / "r", "ckpt-0000004.pt", cfg, *seeds[4])
    replayed = first_step_loss(tmp_path / "r", "ckpt-0000004.pt", cfg, *seeds[0])
    assert logged == pytest.approx(resumed, rel=1e-5)  # rank 0 drew from (seed, rank 0, iteration 4)
    assert abs(logged - replayed) > 1e-3  # not the batch and neighborhoods a fresh run starts with

    # no rank of the resumed run starts with a batch the original rank 0 drew in its first steps
    batches = train.Batches(data / "train.bin", cfg, "cpu")
    g0 = torch.Generator().manual_seed(seeds[0][0])
    seen = [batches.get(g0)[0] for _ in range(4)]
    for rank in (0, 1):
        first = batches.get(torch.Generator().manual_seed(training.stream_seed(SEED_MAX, "batch", rank, 4)))[0]
        assert not any(torch.equal(first, s) for s in seen)


# ----------------------------------------------------------------------------- 7. fp16: what the log says happened


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a scaled-gradient overflow with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * INF


def overflow_at(monkeypatch, iteration=None):
    """Every micro-batch of optimizer step `iteration` (None: of every step) gets an infinite gradient,
    injected through the loop's seam for faults, training.Optimization.forward."""
    original = training.Optimization.forward

    def forward(self, it, micro_step):
        loss, stats = original(self, it, micro_step)
        return (InfGradient.apply(loss), stats) if iteration in (None, it) else (loss, stats)

    monkeypatch.setattr(training.Optimization, "forward", forward)


def test_fp16_overflowed_step_is_logged_as_skipped_and_changes_no_weight(data, tmp_path, monkeypatch):
    overflow_at(monkeypatch, iteration=2)
    train.main(train_argv(data, tmp_path, dtype="float16", max_iters=4, save_interval=1))
    steps = [r for r in read_log(tmp_path / "r") if r["event"] == "train"]
    assert [r["iter"] for r in steps] == [0, 1, 2, 3]
    skipped = [r["skipped"] for r in steps]
    scale = [r["loss_scale"] for r in steps]
    # the forced overflow is skipped; so is any step whose scaled fp16 gradients overflowed by themselves
    # (here the first: 65536 x a loss of 6 is beyond fp16's 65504); a step goes through after each
    assert skipped[2] and not skipped[1] and not skipped[3]
    assert math.isfinite(steps[2]["loss"]) and not math.isfinite(steps[2]["grad_norm"])
    assert scale[0] == 65536.0  # GradScaler's initial scale, recorded as used
    for i in range(3):  # the scaler halves its scale after a skipped step, and only then
        assert skipped[i] == (scale[i + 1] == scale[i] / 2) and (skipped[i] or scale[i + 1] == scale[i])

    ckpts = {i: read_checkpoint(tmp_path / "r" / f"ckpt-{i:07d}.pt") for i in (1, 2, 3, 4)}
    for i in (1, 2, 3):  # ckpt-i holds the weights before iteration i, ckpt-(i+1) those after it
        unchanged = all(torch.equal(ckpts[i]["model"][k], ckpts[i + 1]["model"][k]) for k in ckpts[i]["model"])
        assert unchanged == skipped[i], i
    def adam_steps(ckpt):  # AdamW's own count of the updates it made (no state before the first)
        return {float(state["step"]) for state in ckpt["optimizer"]["state"].values()} or {0.0}
    assert [adam_steps(ckpts[i]) for i in (1, 2, 3, 4)] == [{float(sum(not s for s in skipped[:i]))} for i in (1, 2, 3, 4)]


def test_fp16_gradients_that_overflow_at_any_scale_stop_the_run(data, tmp_path, monkeypatch):
    overflow_at(monkeypatch)
    # 65536 = 2**16 halves to 0.5 after 17 skipped steps: below 1 the scale cannot be the cause
    with pytest.raises(UserError, match=r"non-finite loss at iteration 17: gradient norm \(at fp16 loss scale 0.5\)"):
        train.main(train_argv(data, tmp_path, dtype="float16", max_iters=30, save_interval=100))
    steps = [r for r in read_log(tmp_path / "r") if r["event"] == "train"]
    assert [r["loss_scale"] for r in steps] == [2.0 ** (16 - i) for i in range(17)]
    assert all(r["skipped"] for r in steps)


# ----------------------------------------------------------------------------- 8. leftovers of interrupted writes


def test_partial_checkpoint_is_removed_on_resume_and_never_resumed_from(run, data, tmp_path, capsys):
    shutil.copytree(run, tmp_path / "r")
    leftover = tmp_path / "r" / "ckpt-0000010.pt.tmp1234"
    shutil.copy(run / "ckpt-0000004.pt", leftover)  # even a complete file under a temporary name is no result
    (tmp_path / "r" / "log.jsonl.tmp99").write_text("{")
    train.main(train_argv(data, tmp_path, init_from="resume", max_iters=5, seed=SEED_MAX))
    assert "removed 2 unfinished write(s) of an interrupted run" in capsys.readouterr().out
    assert not list((tmp_path / "r").glob("*.tmp*"))
    assert [r["iter"] for r in read_log(tmp_path / "r") if r["event"] == "resume"] == [4]
    assert (tmp_path / "r" / "ckpt-0000005.pt").is_file()


def test_partial_position_set_is_removed_when_the_folder_is_started(tmp_path):
    out = tmp_path / "pos"
    out.mkdir()
    (out / "positions.npy.tmp4242").write_bytes(b"\x93NUMPY partial")
    init_pos.main(["init_pos.yaml", "n_layer=2", "n_head=2", "n_embed=36", f"seed={SEED_MAX}", f"out={out}"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "positions.npy"]
    assert np.load(out / "positions.npy").shape == (4, 36, 2)


# ----------------------------------------------------------------------------- 9. refusals name their fix


@pytest.mark.torchrun
def test_rank_count_refusal_under_torchrun_says_what_to_set(tmp_path):
    proc = run_script(torchrun(2, "train.py", ["train_shakespeare.yaml", "device=cpu", "backend=gloo",
                                                f"out_dir={tmp_path}"]), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: gradient_accumulation_steps=1 is not divisible by the 2 ranks; set "
                      "gradient_accumulation_steps=2 (a multiple of 2) or run on fewer ranks"]
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_fix(run, data, tmp_path, gpt2_ckpt, sst2):
    def refused(call, *fix):
        with pytest.raises(UserError) as e:
            call()
        assert all(f in str(e.value) for f in fix), str(e.value)

    cfg = load_config(train.TrainConfig, train_argv(data, tmp_path, gradient_accumulation_steps=3))
    refused(lambda: train.train(cfg, Dist(0, 0, 2, "cpu", True)), "set gradient_accumulation_steps=4")
    refused(lambda: train.main(train_argv(data, tmp_path, init_from="resume")), "use init_from=scratch")
    refused(lambda: train.main(train_argv(data, run.parent, init_from="resume", n_layer=3)),
            "n_layer=2 in checkpoint vs 3 now", "set these keys as in the checkpoint")
    refused(lambda: train.main(train_argv(data, tmp_path, vocab_size=32)), "set vocab_size >= ")
    refused(lambda: train.main(train_argv(data, tmp_path, block_size=5000)), "lower block_size")
    refused(lambda: train.main(["no_such_preset.yaml"]), "train_shakespeare.yaml")
    refused(lambda: finetune.main(finetune_argv(gpt2_ckpt, sst2, tmp_path, max_length=64)), "set max_length <= 32")
    refused(lambda: finetune.main(finetune_argv(gpt2_ckpt, sst2, tmp_path, batch_size=40)), "lower batch_size")
    refused(lambda: finetune.main(finetune_argv(gpt2_ckpt, sst2, tmp_path, init_from="resume")),
            "use init_from=pretrained")
    assert not (tmp_path / "sst2").exists() and not (tmp_path / "r").exists()  # refused before writing


# ----------------------------------------------------------------------------- 10. text read exactly


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def test_tsv_text_that_looks_missing_stays_text(tmp_path):
    words = ["NA", "null", "None", "N/A", "nan", "", "NULL", "#N/A", "-nan"]
    rows = [[w, str(i % 2)] for i, w in enumerate(words)]
    write_tsv(tmp_path / "cola" / "train.tsv", ["sentence", "label"], rows)
    write_tsv(tmp_path / "cola" / "validation.tsv", ["sentence", "label"], rows)
    raw = glue.load_glue("cola", str(tmp_path))
    assert raw["train"]["sentence"] == words
    ex = glue.tokenize(raw["train"], "cola", 16)
    enc = glue.gpt2_encoding()
    assert [e.tolist() for e in ex.ids[:5]] == [enc.encode_ordinary(w) for w in words[:5]]
    assert all(e.tolist() != [glue.EOT_TOKEN] for e in ex.ids[:5])  # never the lone end-of-text token


def test_tsv_written_with_standard_quoting_loses_its_escape_quotes(tmp_path):
    sentences = ['He said "no".', 'a "quoted" word and a tab-free line', "plain text", '"', 'x ""y""']
    frame = pd.DataFrame({"sentence1": sentences, "sentence2": ["b"] * 5, "label": [0.5, 1, 2, 3, 4.25]})
    (tmp_path / "stsb").mkdir()
    for split in ("train", "validation"):
        frame.to_csv(tmp_path / "stsb" / f"{split}.tsv", sep="\t", index=False)
    assert '"He said ""no""."' in (tmp_path / "stsb" / "train.tsv").read_text()  # pandas did quote it
    raw = glue.load_glue("stsb", str(tmp_path))
    assert raw["validation"]["sentence1"] == sentences
    assert [float(x) for x in raw["train"]["label"]] == [0.5, 1, 2, 3, 4.25]

    # raw GLUE files never quote, and their sentences hold unbalanced quotes: read verbatim
    raw_rows = [['"Hello, he said', "0"], ['she "left', "1"], ['"whole"', "0"]]
    write_tsv(tmp_path / "cola" / "train.tsv", ["sentence", "label"], raw_rows)
    write_tsv(tmp_path / "cola" / "validation.tsv", ["sentence", "label"], raw_rows)
    assert glue.load_glue("cola", str(tmp_path))["train"]["sentence"] == [r[0] for r in raw_rows]


def test_jsonl_text_with_unicode_line_separators_is_kept_whole(tmp_path):
    sentences = ["one\u2028two", "three\x85four", "five\x0csix", "naïve café"]
    for split in ("train", "validation"):
        path = tmp_path / "sst2" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"sentence": s, "label": 1}, ensure_ascii=False) + "\n"
                                for s in sentences), encoding="utf-8")
    assert glue.load_glue("sst2", str(tmp_path))["train"]["sentence"] == sentences
    # every JSON-lines input goes through the same reader: BLiMP pairs and corpus text keep them too
    from topolm.blimp import load_blimp_local
    from topolm.corpus import iter_jsonl_column
    from topolm.files import read_jsonl
    pairs = tmp_path / "blimp" / "wh_island.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("".join(json.dumps({"sentence_good": s, "sentence_bad": s[::-1]}, ensure_ascii=False) + "\n"
                             for s in sentences), encoding="utf-8")
    assert load_blimp_local(pairs.parent).good == sentences
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\ufeff" + "".join(json.dumps({"text": s}, ensure_ascii=False) + "\r\n\n" for s in sentences),
                    encoding="utf-8")
    assert list(iter_jsonl_column(docs, "text")) == sentences
    assert [n for n, _ in read_jsonl(docs)] == [1, 3, 5, 7]  # blank lines skipped, numbers are the file's
    docs.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs.jsonl line 2: a JSON list, not an object"):
        list(read_jsonl(docs))


def test_latin1_glue_file_is_refused_naming_file_and_line(gpt2_ckpt, sst2, tmp_path):
    shutil.copytree(sst2, tmp_path / "glue")
    bad = tmp_path / "glue" / "sst2" / "validation.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps({"sentence": "café crème", "label": 1}, ensure_ascii=False)
    bad.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))} line 3, byte 18: not valid UTF-8 \(byte 0xe9\)"):
        finetune.main(finetune_argv(gpt2_ckpt, tmp_path / "glue", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    tsv = tmp_path / "latin.tsv"
    tsv.write_bytes("sentence\tlabel\nok\t0\nna\xefve\t1\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin.tsv line 3, byte 3: not valid UTF-8"):
        read_text(tsv)


def test_prompt_files_are_read_exactly(gpt2_ckpt, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("Ünïcödé prompt\n".encode("latin-1"))
    with pytest.raises(UserError) as e:  # cli_main makes it one `error:` line, exit 2
        sample.main([f"ckpt={gpt2_ckpt}", f"start=FILE:{prompt}"])
    assert str(e.value) == f"{prompt} line 1, byte 1: not valid UTF-8 (byte 0xdc); save the file as UTF-8 " \
        "(e.g. iconv -f latin1 -t utf-8)"
    prompt.write_text("Ünïcödé prompt\n", encoding="utf-8")
    sample.main([f"ckpt={gpt2_ckpt}", f"start=FILE:{prompt}", "num_samples=1", "max_new_tokens=3"])
    assert capsys.readouterr().out.splitlines()[1].startswith("Ünïcödé prompt")


# ----------------------------------------------------------------------------- 12. an overwrite replaces every output


def test_finetune_overwrite_replaces_every_output(gpt2_ckpt, sst2, tmp_path, capsys):
    task_dir = tmp_path / "sst2"
    finetune.main(finetune_argv(gpt2_ckpt, sst2, tmp_path, seed=1))
    first = json.loads((task_dir / "metrics.json").read_text())
    # what a killed later run would have left: a finetuning state and unfinished writes
    shutil.copy(task_dir / "ckpt-best.pt", task_dir / "ckpt-last.pt")
    (task_dir / "ckpt-best.pt.tmp31337").write_bytes(b"partial")
    (task_dir / "predictions-validation.jsonl.tmp31337").write_text("{")
    (task_dir / "predictions-test.jsonl").write_text("{}\n")
    capsys.readouterr()
    finetune.main(finetune_argv(gpt2_ckpt, sst2, tmp_path, seed=2, max_iters=4, overwrite="true"))
    assert "removed 2 unfinished write(s)" in capsys.readouterr().out
    assert sorted(p.name for p in task_dir.iterdir()) == ["ckpt-best.pt", "log.jsonl", "metrics.json",
                                                          "predictions-validation.jsonl"]
    log = read_log(task_dir)
    assert [r["event"] for r in log].count("start") == 1
    assert log[0]["config"]["seed"] == 2 and log[-1]["event"] == "end" and log[-1]["iter"] == 4
    second = json.loads((task_dir / "metrics.json").read_text())
    assert first["iters"] == 2 and second["iters"] == 4


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold key: value lines"):
        load_config(train.TrainConfig, [str(bad)])


def test_an_output_path_the_system_refuses_is_one_error_line(tmp_path):
    # out_dir names a file: the run folder cannot be made there
    (tmp_path / "afile").write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    np.arange(4000, dtype=np.uint16).__mod__(64).astype(np.uint16).tofile(data / "train.bin")
    np.arange(4000, dtype=np.uint16).__mod__(64).astype(np.uint16).tofile(data / "val.bin")
    proc = run_in_process([PYTHON, "train.py", "train_shakespeare.yaml",
                       *overrides(dataset=str(data), out_dir=str(tmp_path / "afile"), run_name="r", max_iters=1)],
                      check=False)
    one_error_line(proc, "afile", "cannot write into")
