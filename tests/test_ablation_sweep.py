"""The ablation sweep (ablate.py with a list of k): units chosen per site or over the network, zeroed at the site
or at the sublayer's input, the random draws' per-site counts, the k = 0 entry and each entry against a run of that
k alone, the control beside the model, the curves' figure, and the refusals."""
import copy
import json

import matplotlib
import numpy as np
import pytest
import torch
from torch.nn import functional as F

matplotlib.use("Agg")

import ablate  # noqa: E402
import blimp  # noqa: E402
from conftest import one_error_line, run_main, write_units  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from positions import random_layout  # noqa: E402
from topolm import figures  # noqa: E402
from topolm.ablation import (chosen_units, input_points, random_units, top_units_network, validation_loss,  # noqa: E402
                             zeroed_units)
from topolm.blimp import gpt_logits  # noqa: E402
from topolm.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from topolm.config import UserError  # noqa: E402


def tiny_model(with_resid=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=60, radius=2, bias=True,
                          neighborhoods_per_batch=3, with_resid=with_resid), random_layout(4, 36, 2)).eval()
    for p in model.parameters():  # larger weights than the init (and nonzero biases), so no product is near zero
        p.data.add_(0.2 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- where=input


@pytest.mark.parametrize("with_resid", [False, True])
def test_where_input_zeroes_exactly_the_chosen_input_columns(with_resid):
    model = tiny_model(with_resid)
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        intact = gpt_logits(model)(ids)
    chosen = {"layer.0.attn": [3, 0, 35], "layer.0.mlp": [], "layer.1.mlp": list(range(10)), "layer.1.attn": [7]}
    seen = {}  # what each block reads (its residual input) and each first linear layer computes, while ablated
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0])))
        handles.append(block.ln_2.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("ln_2", i), o)))
        for kind, layer in (("attn", block.attn.c_attn), ("mlp", block.mlp.c_fc)):
            handles.append(layer.register_forward_hook(lambda m, a, o, k=(kind, i): seen.__setitem__(k, o)))
    with torch.no_grad(), zeroed_units(model, chosen, "input"):
        ablated = gpt_logits(model)(ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            for kind, layer, reads in (("attn", block.attn.c_attn, block.ln_1(seen[("x", i)])),
                                       ("mlp", block.mlp.c_fc, seen[("ln_2", i)])):
                cols = chosen[f"layer.{i}.{kind}"]
                weight = layer.weight.clone()
                weight[:, cols] = 0.0  # the research code's ablation: those input columns of the weight zero
                by_hand = F.linear(reads, weight, layer.bias)
                torch.testing.assert_close(seen[(kind, i)], by_hand, rtol=0, atol=1e-6)
                if cols:  # the columns mattered: without zeroing them the product differs
                    assert (F.linear(reads, layer.weight, layer.bias) - by_hand).abs().max() > 1e-3
                else:
                    torch.testing.assert_close(seen[(kind, i)], F.linear(reads, layer.weight, layer.bias), rtol=0,
                                               atol=1e-6)
    assert (ablated - intact).abs().max() > 1e-3
    # the reference implementation: a copy whose weight columns are zeroed in place gives the same logits
    masked = copy.deepcopy(model)
    for name, cols in chosen.items():
        with torch.no_grad():
            input_points(masked)[name].weight[:, cols] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(gpt_logits(masked)(ids), ablated, rtol=0, atol=1e-5)
    # nothing of the model changed, and nothing stays hooked
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(gpt_logits(model)(ids), intact)


def test_where_input_leaves_the_site_outputs_and_where_site_leaves_the_inputs():
    model = tiny_model()
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(2))
    intact = model.site_activations(ids)
    with zeroed_units(model, {"layer.0.attn": [4, 5]}, "input"):
        acts = model.site_activations(ids)
    # the sublayer still writes every dimension (none is zero), from an input with dimensions 4 and 5 removed
    assert (acts["layer.0.attn"][..., [4, 5]] != 0).all()
    assert not torch.equal(acts["layer.0.attn"], intact["layer.0.attn"])
    with zeroed_units(model, {"layer.0.attn": [4, 5]}, "site"):
        acts = model.site_activations(ids)
    assert (acts["layer.0.attn"][..., [4, 5]] == 0).all()
    with pytest.raises(ValueError, match="unknown site"):
        with zeroed_units(model, {"layer.9.mlp": [1]}, "input"):
            pass


# ----------------------------------------------------------------------------- choosing units


def test_top_units_over_the_network_rank_every_site_together():
    t = np.array([[0.5, 3.0, np.nan, 3.0], [1.0, 2.0, 4.0, np.nan], [-1.0, 0.0, 3.0, 0.1]])
    chosen = top_units_network(t, 4)  # 4.0 (site 1), then the three 3.0: site 0 units 1 and 3, then site 2 unit 2
    assert [c.tolist() for c in chosen] == [[1, 3], [2], [2]]
    chosen = top_units_network(t, 10)  # every defined unit, in descending t within each site; NaN never
    assert [c.tolist() for c in chosen] == [[1, 3, 0], [2, 1, 0], [2, 3, 1, 0]]
    assert [c.tolist() for c in top_units_network(t, 0)] == [[], [], []]
    with pytest.raises(UserError, match=r"k=11: u.npz has a defined t_localizer at only 10 of 12 units of the "
                                        r"network \(3 sites\).*k <= 10"):
        top_units_network(t, 11, "u.npz")
    per_site = chosen_units(t, 2, "site")
    assert [c.tolist() for c in per_site] == [[1, 3], [2, 1], [2, 3]]


def test_random_units_take_the_given_count_at_every_site():
    draw = random_units([3, 0, 36, 1], 36, np.random.default_rng(0))
    assert [len(d) for d in draw] == [3, 0, 36, 1] and all(len(set(d.tolist())) == len(d) for d in draw)
    assert sorted(draw[2].tolist()) == list(range(36))
    # with equal counts the same draws as one k per site
    rng = np.random.default_rng(7)
    expected = [rng.choice(36, size=5, replace=False).tolist() for _ in range(4)]
    assert [d.tolist() for d in random_units([5] * 4, 36, np.random.default_rng(7))] == expected


# ----------------------------------------------------------------------------- the sweep end to end


@pytest.fixture(scope="module")
def units(gpt2_run, tmp_path_factory):
    """A units file for the session's model: t with a clear ranking over the network (site 2 holds most of the
    largest), a few NaN units, and the units significant where t > 1."""
    model, _, _ = load_model(gpt2_run.ckpt)
    t = np.random.default_rng(0).normal(size=(len(model.site_names), model.config.n_embed))
    t[2] += 1.5
    t[0, :3] = np.nan
    path = tmp_path_factory.mktemp("units") / "units.npz"
    return write_units(path, gpt2_run.ckpt, t_localizer=t, selective_localizer=np.nan_to_num(t) > 1.0), t


def run(gpt2_run, out, *args):
    common = [f"data_dir={gpt2_run.pairs}", f"dataset={gpt2_run.data}", "val_batches=1", "val_batch_size=2",
              f"out={out}", "seed=3"]
    ran = run_main(ablate, [f"ckpt={gpt2_run.ckpt}", *common, *args])
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("select, where", [("network", "input"), ("site", "site")])
def test_each_sweep_entry_equals_a_run_of_that_k_alone_and_k0_is_the_intact_model(gpt2_run, units, tmp_path,
                                                                                    select, where):
    path, t = units
    modes = [f"units={path}", f"select={select}", f"where={where}"]
    sweep = run(gpt2_run, tmp_path / "sweep.json", "k=7,0,3", *modes)
    assert sweep["k"] == [0, 3, 7] and [e["k"] for e in sweep["sweep"]] == [0, 3, 7]
    for k, entry in zip((3, 7), sweep["sweep"][1:]):
        alone = run(gpt2_run, tmp_path / f"k{k}.json", f"k={k}", *modes)
        assert alone["sweep"] == [entry]  # the units, the scores and every random draw, exactly
        assert alone["intact"] == sweep["intact"]
    # k = 0: the intact model, blimp.py's score and the validation loss of the same windows
    model, _, _ = load_model(gpt2_run.ckpt)
    zero = sweep["sweep"][0]
    blimp.main([f"ckpt={gpt2_run.ckpt}", f"data_dir={gpt2_run.pairs}", f"out={tmp_path / 'blimp.json'}"])
    alone = json.loads((tmp_path / "blimp.json").read_text())["overall"]
    tokens = np.fromfile(gpt2_run.data / "val.bin", dtype=np.uint16)
    intact_loss = validation_loss(model, tokens, 1, 2, 3)
    for scores in (zero["selective"], *zero["random"]["draws"], sweep["intact"]):
        assert scores["blimp"] == alone["accuracy"] and scores["blimp_paradigm_mean"] == alone["paradigm_mean"]
        assert scores["val_loss"] == intact_loss
    assert zero["n_units"] == 0 and zero["random"]["val_loss"]["std"] == 0.0
    # the top-k entry is the model with exactly those units zeroed at that place
    top = sweep["sweep"][2]["selective"]
    assert top["units"] == {n: c.tolist() for n, c in zip(model.site_names, chosen_units(t, 7, select))}
    with zeroed_units(model, top["units"], where):
        assert top["val_loss"] == validation_loss(model, tokens, 1, 2, 3) != intact_loss
    assert top["significant_per_site"] == [int((np.nan_to_num(t[s, u]) > 1.0).sum())
                                           for s, u in enumerate(top["units"].values())]
    assert all(np.isfinite(t[s, u]).all() for s, u in enumerate(top["units"].values()))  # never an undefined t
    png = tmp_path / "sweep.png"
    assert sweep["figure"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_network_random_draws_take_the_per_site_counts_of_the_top_k(gpt2_run, units, tmp_path):
    path, t = units
    r = run(gpt2_run, tmp_path / "net.json", f"units={path}", "k=5,40", "select=network", "draws=6")
    for entry in r["sweep"]:
        counts = [len(u) for u in entry["selective"]["units"].values()]
        assert sum(counts) == entry["k"] == entry["n_units"] and counts == entry["units_per_site"]
        draws = entry["random"]["draws"]
        assert len(draws) == 6 and len({json.dumps(d["units"]) for d in draws}) == 6
        for d in draws:
            assert [len(u) for u in d["units"].values()] == counts
            assert all(len(set(u)) == len(u) and all(0 <= x < 36 for x in u) for u in d["units"].values())
    counts = r["sweep"][1]["units_per_site"]
    assert counts[2] == max(counts) and len(set(counts)) > 1  # uneven: the network's ranking, not k per site


def control_of(gpt2_run, folder):
    """A copy of the session's checkpoint with other weights (a stand-in for its control), saved by the writer."""
    ckpt = load_checkpoint(gpt2_run.ckpt)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] = 1.5 * ckpt["model"]["transformer.h.0.mlp.c_fc.weight"]
    folder.mkdir()
    save_checkpoint(ckpt, folder / gpt2_run.ckpt.name)
    return folder / gpt2_run.ckpt.name


def test_the_control_is_swept_beside_the_model(gpt2_run, units, tmp_path):
    path, t = units
    control = control_of(gpt2_run, tmp_path / "control")
    control_t = t[:, ::-1].copy()
    control_units = write_units(tmp_path / "control_units.npz", control, t_localizer=control_t)
    both = run(gpt2_run, tmp_path / "both.json", f"units={path}", "k=0,4", f"control={control}",
               f"control_units={control_units}", "where=input")
    model_alone = run(gpt2_run, tmp_path / "model.json", f"units={path}", "k=0,4", "where=input")
    ran = run_main(ablate, [f"ckpt={control}", f"units={control_units}", "k=0,4", "where=input",
                            f"data_dir={gpt2_run.pairs}", f"dataset={gpt2_run.data}", "val_batches=1",
                            "val_batch_size=2", f"out={tmp_path / 'control.json'}", "seed=3"])
    assert ran.returncode == 0, ran.stderr[-2000:]
    control_alone = json.loads((tmp_path / "control.json").read_text())
    for key in ("checkpoint", "provenance", "units_provenance", "intact", "sweep"):
        assert both[key] == model_alone[key] and both["control"][key] == control_alone[key], key
    assert both["control"]["checkpoint"] == str(control) and model_alone["control"] is None
    assert both["control"]["intact"]["val_loss"] != both["intact"]["val_loss"]
    # select=site: both models' random draws at a k are the same units (one stream per k)
    assert both["control"]["sweep"][1]["random"]["draws"][0]["units"] == both["sweep"][1]["random"]["draws"][0]["units"]
    assert (tmp_path / "both.png").is_file()


# ----------------------------------------------------------------------------- the figure


def fake_record(rng, ks, draws=5):
    def scores():
        return {"blimp": float(rng.random()), "val_loss": float(5 + rng.random())}

    def spread(values):
        return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
    sweep = []
    for k in ks:
        runs = [scores() for _ in range(draws)]
        sweep.append({"k": k, "selective": scores(), "random": {key: spread([r[key] for r in runs])
                                                                for key in ("blimp", "val_loss")}})
    return {"intact": scores(), "sweep": sweep}


def test_the_ablation_figure_draws_every_k_with_its_legend_inside_the_figure():
    rng = np.random.default_rng(0)
    ks = [1, 28, 196, 392, 784, 1568, 3136, 12544]
    models = [("demo-topo (step 1000)", fake_record(rng, ks)), ("demo-control (step 1000)", fake_record(rng, ks))]
    fig = figures.plot_ablation(models, "network", "input", 5)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 2
    assert [ax.get_ylabel() for ax in panels] == ["BLiMP accuracy (fraction of pairs)",
                                                  "validation loss (nats per token)"]
    assert all("units zeroed in all" in ax.get_xlabel() for ax in panels)
    for ax, key in zip(panels, ("blimp", "val_loss")):
        lines = ax.lines
        assert len(lines) == 4  # per model: top-k and the random mean
        for c, (_, record) in enumerate(models):
            top, mean = lines[2 * c], lines[2 * c + 1]
            assert top.get_xdata().tolist() == [0, *ks]
            assert top.get_ydata().tolist() == [record["intact"][key]] + [e["selective"][key] for e in record["sweep"]]
            assert mean.get_ydata().tolist() == [record["intact"][key]] + [e["random"][key]["mean"]
                                                                           for e in record["sweep"]]
        assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= 12544
    legend = fig.legends[0]
    box, page = legend.get_window_extent(), fig.bbox
    assert box.x0 >= page.x0 and box.y0 >= page.y0 and box.x1 <= page.x1 and box.y1 <= page.y1
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 6 and "demo-control (step 1000): random units, mean of 5 draws" in texts
    assert "over the whole network" in fig._suptitle.get_text() and "input" in fig._suptitle.get_text()
    # without a validation loss: one panel
    for _, record in models:
        for scores in [record["intact"]] + [e["selective"] for e in record["sweep"]]:
            scores["val_loss"] = None
    fig = figures.plot_ablation(models[:1], "site", "site", 5)
    assert len([ax for ax in fig.axes if ax.lines]) == 1


# ----------------------------------------------------------------------------- refusals


def test_a_k_above_the_units_there_are_is_refused_before_anything_is_written(gpt2_run, units, tmp_path):
    path, t = units
    out = tmp_path / "abl" / "refused.json"
    args = [f"ckpt={gpt2_run.ckpt}", f"units={path}", f"data_dir={gpt2_run.pairs}", f"out={out}"]
    one_error_line(run_main(ablate, [*args, "k=2,37"]), "k=37 exceeds the 36 units of a site", "choose k <= 36",
                   "select=network")
    one_error_line(run_main(ablate, [*args, "k=145", "select=network"]),
                   "k=145 exceeds the 144 units of the network", "4 sites x 36 units", "choose k <= 144")
    # the network has 141 units with a defined t: 142 is refused by the guard, naming the count
    one_error_line(run_main(ablate, [*args, "k=142", "select=network"]),
                   "k=142", f"units={path}", "only 141 of 144 units of the network", "k <= 141")
    one_error_line(run_main(ablate, [*args, "k=34"]), "only 33 of 36 units of layer.0.attn", "k <= 33")
    for bad in ("k=1,,2", "k=-1", "k=a", "k=1.5"):
        one_error_line(run_main(ablate, [*args, bad]), "must be a number of units >= 0 or a comma-separated list")
    one_error_line(run_main(ablate, [*args, "k=3,1,3"]), "lists 3 more than once")
    one_error_line(run_main(ablate, [*args, f"control={gpt2_run.ckpt}"]), "control= and control_units= go together")
    one_error_line(run_main(ablate, [*args, "select=all"]), "select must be one of site, network")
    one_error_line(run_main(ablate, [*args, "where=output"]), "where must be one of site, input")
    assert not (tmp_path / "abl").exists()
