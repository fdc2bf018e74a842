"""The model: sites, hooks, alpha=0, positions inside the state_dict."""
import pytest
import torch

from model import GPT, GPTConfig
from positions import neighborhood_loss, random_layout


def tiny(**kw):
    cfg = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embed=36, block_size=16, vocab_size=50, radius=2,
                              neighborhoods_per_batch=3, alpha=2.0), **kw})
    torch.manual_seed(0)
    return GPT(cfg, random_layout(cfg.n_sites, cfg.n_embed, seed=1))


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def test_site_names_and_hooks():
    model = tiny()
    assert model.site_names == ["layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp"]
    acts = model.site_activations(batch()[0])
    assert list(acts) == model.site_names and acts["layer.1.mlp"].shape == (3, 16, 36)


@pytest.mark.parametrize("with_resid", [False, True])
def test_spatial_loss_uses_the_site_activations(with_resid):
    """Recompute each site's loss from hooked activations with the same sampled units."""
    model = tiny(with_resid=with_resid)
    x, y = batch()
    _, losses = model(x, y, generator=torch.Generator().manual_seed(5))
    units = model.sheet.sample_units(3, torch.Generator().manual_seed(5))
    acts = model.site_activations(x)
    block = model.transformer.h[0]
    h0 = model.transformer.wte(x) + model.transformer.wpe(torch.arange(16))
    attn_out = block.attn(block.ln_1(h0))
    expected_act = h0 + attn_out if with_resid else attn_out
    torch.testing.assert_close(acts["layer.0.attn"], expected_act.detach())
    sheet = model.sheet
    for s, name in enumerate(model.site_names):
        a = acts[name].reshape(-1, 36)[:, units[s]].view(-1, 3, 9).transpose(0, 1)
        expected = neighborhood_loss(a, sheet.target, sheet.tril_rows, sheet.tril_cols).mean()
        assert losses.per_site[s].item() == pytest.approx(expected.item(), abs=1e-5)
    assert losses.spatial.item() == pytest.approx(2.0 * losses.per_site.sum().item(), rel=1e-6)
    assert losses.total.item() == pytest.approx(losses.task.item() + losses.spatial.item(), rel=1e-6)


def test_alpha_zero_does_no_spatial_work():
    model = tiny(alpha=0.0)
    x, y = batch()
    g = torch.Generator().manual_seed(3)
    before = g.get_state().clone()
    calls = []
    model.sheet.site_gram = lambda *a, **k: calls.append(1)  # would be called by any spatial work
    model.sheet.loss = lambda *a, **k: calls.append(1)
    _, losses = model(x, y, generator=g)
    assert torch.equal(g.get_state(), before)  # no neighborhood was even sampled
    assert not calls
    assert losses.spatial.item() == 0.0 and torch.equal(losses.total, losses.task)


def test_alpha_changes_nothing_but_the_spatial_term():
    x, y = batch()
    _, a = tiny(alpha=0.0)(x, y)
    _, b = tiny(alpha=2.0)(x, y, generator=torch.Generator().manual_seed(0))
    assert a.task.item() == pytest.approx(b.task.item(), abs=1e-6)
    assert b.spatial.item() > 0


def test_positions_travel_in_state_dict():
    model = tiny()
    sd = model.state_dict()
    assert "sheet.unit_coords" in sd and "sheet.cell_to_unit" not in sd
    other = GPT(model.config)  # identity layout until loaded
    other.load_state_dict(sd)
    assert torch.equal(other.sheet.unit_coords, model.sheet.unit_coords)
    assert torch.equal(other.sheet.cell_to_unit, model.sheet.cell_to_unit)  # membership rebuilt on load


def test_generate_shapes_and_top_k():
    model = tiny()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1.0, top_k=1)
    assert out.shape == (1, 8)
    again = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1.0, top_k=1)
    assert torch.equal(out, again)  # top_k=1 is greedy


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embed=40, n_head=2, sheet_rows=3), "sheet_rows=3 does not divide n_embed=40"),
    (dict(n_embed=40, radius=4), "too large for a 5x8 grid"),
    (dict(n_head=5), "not divisible"),
    (dict(radius=4), "too large"),
    (dict(radius=0), "must be >= 1"),
    (dict(neighborhoods_per_batch=17), "exceeds"),
    (dict(n_output_ids=50305), "n_output_ids"),
])
def test_config_checks(kw, msg):
    base = dict(n_layer=1, n_head=2, n_embed=36, radius=2, neighborhoods_per_batch=3)
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**{**base, **kw})


def test_compiled_forward_has_no_graph_break():
    """The spatial loss runs under torch.compile in one graph (neighborhoods drawn outside, as train.py does)."""
    import torch._dynamo
    model = tiny()
    x, y = batch()
    units = model.sample_units(torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, b, u: model(a, b, units=u)[1].total)(x, y, units)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_restricted_output_vocabulary_is_the_masked_full_softmax():
    """n_output_ids: the loss and gradients equal a full-vocabulary model's whose logits outside
    output_ids are set to -inf; every forward's logits are -inf there; the ids travel in the state_dict."""
    ids = torch.tensor([0, 3, 4, 7, 11, 12, 20, 31, 40, 49])
    full, restricted = tiny(), tiny(n_output_ids=len(ids))
    restricted.load_state_dict({**full.state_dict(), "output_ids": ids})
    g = torch.Generator().manual_seed(0)
    x = ids[torch.randint(0, len(ids), (3, 16), generator=g)]
    y = torch.roll(x, -1, 1)
    y[0, :4] = -1  # ignored positions stay ignored
    units = full.sample_units(torch.Generator().manual_seed(2))
    mask = torch.full((50,), float("-inf"))
    mask[ids] = 0.0
    h, per_site = full.encode(x, units=units)
    masked = full.lm_head(h) + mask
    expected = torch.nn.functional.cross_entropy(masked.view(-1, 50), y.view(-1), ignore_index=-1)
    expected.backward()
    logits, losses = restricted(x, y, units=units)
    losses.task.backward()
    torch.testing.assert_close(losses.task, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, masked.detach(), rtol=1e-6, atol=1e-6)
    assert torch.isinf(logits[..., [1, 2, 48]]).all() and torch.isfinite(logits[..., ids]).all()
    for (name, p), q in zip(full.named_parameters(), restricted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # return_logits=False gives the same loss without building the logits
    none, same = restricted(x, y, units=units, return_logits=False)
    assert none is None and torch.equal(same.task, losses.task)
    # generation never picks an id outside output_ids; sampling logits are -inf there too
    last, _ = restricted(x)
    assert last.shape == (3, 1, 50) and torch.isinf(last[..., [1, 2, 48]]).all()
    out = restricted.generate(x[:, :2], 12, generator=torch.Generator().manual_seed(0))
    assert torch.isin(out, ids).all()
    # a target outside output_ids has probability 0: the loss is inf, not a silently wrong number
    y_out = y.clone()
    y_out[1, 3] = 5
    assert torch.isinf(restricted(x, y_out, units=units)[1].task)
    # the ids are part of the model: a fresh model loading the state_dict gets them back
    again = GPT(GPTConfig(**{**vars(restricted.config)}))
    again.load_state_dict(restricted.state_dict())
    assert torch.equal(again.output_ids, ids)
    with pytest.raises(ValueError, match="strictly increasing"):
        restricted.set_output_ids(ids.flip(0))


def test_adamw_is_the_reference_update():
    """configure_adamw's (fused) AdamW takes the same steps as the reference single-tensor loop."""
    from model import configure_adamw
    model, ref = tiny(), tiny()
    opt = configure_adamw(model, 0.1, 1e-2, (0.9, 0.99), "cpu")
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.99), foreach=False)
    x, y = batch()
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            _, losses = m(x, y, units=m.sample_units(torch.Generator().manual_seed(step)))
            losses.total.backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, tiny().transformer.h[0].mlp.c_fc.weight)
