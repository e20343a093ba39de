"""One intervention protocol: adapters, Steering and Ablation share hooks / first_layer / applied; `scale`
multiplies for every kind; one normaliser; one positions vocabulary."""

from __future__ import annotations

import pytest
import torch

import em_interp as em
from em_interp.config import TrainConfig
from em_interp.errors import AdapterError, GeometryError, TrainingError
from em_interp.geometry import loss_on
from em_interp.interventions import (
    Ablation,
    Direction,
    Intervention,
    Steering,
    ablate,
    as_interventions,
    interventions_applied,
    steer,
)
from em_interp.model.hooks import hooks_applied
from em_interp.testing import tiny_chat_records

IDS = torch.tensor([[1, 520, 3301, 905, 77, 1244, 2]])


@pytest.fixture
def model(_tiny_model_cached):
    yield _tiny_model_cached
    assert not any(hp.fwd_hooks for hp in _tiny_model_cached.hook_dict.values()), "a test left hooks behind"


def _direction(model, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(int(model.cfg.d_model), generator=g), layer)


def _kinds(model):
    """One of each intervention kind, each with an own scale other than 1 where it has one."""
    vec = em.SteeringVector(model, layer=1, init="random", alpha=3.0, seed=1)
    vec.scale = 0.5
    vecs = em.SteeringSet(model, layers=[1, 2], init="random", alpha=2.0, seed=2)
    vecs.scale = 1.5
    lora = em.LoRA(model, layer=2, rank=2, site="mlp_out")
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(generator=torch.Generator().manual_seed(3))
    lora.scale = 0.75
    d = _direction(model)
    return {"steering_vector": vec, "steering_set": vecs, "lora": lora, "steering": Steering(d, 4.0),
            "ablation": Ablation(d, layers=[1], scale=0.5)}


def _resid(model, intervention, scale, name):
    """The activation at `name` (read after the intervention's hooks) with `intervention` applied at `scale`."""
    out = {}

    def grab(act, hook):
        out["act"] = act.detach().clone()

    with torch.no_grad(), intervention.applied(model, scale=scale), hooks_applied(model, [(name, grab)]):
        model(IDS)
    return out["act"]


def _plain(model, name):
    out = {}

    def grab(act, hook):
        out["act"] = act.detach().clone()

    with torch.no_grad(), hooks_applied(model, [(name, grab)]):
        model(IDS)
    return out["act"]


@pytest.mark.parametrize("kind", ["steering_vector", "steering_set", "lora", "steering", "ablation"])
def test_every_kind_speaks_the_protocol(model, kind):
    intervention = _kinds(model)[kind]
    assert isinstance(intervention, Intervention)
    assert as_interventions(intervention) == [intervention]
    hooks = intervention.hooks(model)
    assert hooks and all(isinstance(name, str) and callable(fn) for name, fn in hooks)
    assert intervention.first_layer == min(int(name.split(".")[1]) for name, _ in hooks)


@pytest.mark.parametrize("kind", ["steering_vector", "steering_set", "lora", "steering", "ablation"])
def test_scale_multiplies_for_every_kind(model, kind):
    """applied(scale=s) changes the first changed activation by s times the change at scale 1, and the
    intervention's own scale multiplies too (the change at own scale a, s = 2 equals own scale 2a, s = 1)."""
    intervention = _kinds(model)[kind]
    name = {"lora": "blocks.2.hook_resid_post"}.get(kind, "blocks.1.hook_resid_post")
    plain = _plain(model, name)
    one = _resid(model, intervention, 1.0, name) - plain
    three = _resid(model, intervention, 3.0, name) - plain
    assert float(one.abs().max()) > 1e-3
    torch.testing.assert_close(three, 3.0 * one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_resid(model, intervention, 0.0, name), plain, atol=0, rtol=0)
    own = intervention.scale
    twice = _resid(model, intervention, 2.0, name)
    intervention.scale = 2 * own
    try:
        torch.testing.assert_close(_resid(model, intervention, 1.0, name), twice, atol=1e-5, rtol=1e-5)
    finally:
        intervention.scale = own


def test_ablation_scale_is_the_fraction_removed(model):
    d = _direction(model, layer=1)
    name = "blocks.1.hook_resid_post"
    plain = _plain(model, name)
    full = _resid(model, Ablation(d, layers=[1]), 1.0, name)
    half = _resid(model, Ablation(d, layers=[1], scale=0.5), 1.0, name)
    along = plain @ d.vector
    assert float(along.abs().max()) > 1e-3
    torch.testing.assert_close(full @ d.vector, torch.zeros_like(along), atol=1e-5, rtol=0)
    torch.testing.assert_close(half @ d.vector, 0.5 * along, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half - (half @ d.vector)[..., None] * d.vector, plain - along[..., None] * d.vector,
                               atol=1e-5, rtol=1e-5)  # the orthogonal part untouched
    with torch.no_grad(), ablate(model, d, layers=[1], scale=0.5):
        by_function = model(IDS)
    with torch.no_grad(), Ablation(d, layers=[1], scale=0.5).applied(model):
        by_object = model(IDS)
    torch.testing.assert_close(by_function, by_object, atol=0, rtol=0)


def test_steer_function_equals_steering_object(model):
    d = _direction(model, layer=2)
    with torch.no_grad(), steer(model, d, 6.0):
        by_function = model(IDS)
    with torch.no_grad(), Steering(d, 3.0).applied(model, scale=2.0):
        by_object = model(IDS)
    torch.testing.assert_close(by_function, by_object, atol=1e-5, rtol=0)


def test_loss_on_accepts_every_intervention_kind(model):
    """The one normaliser: loss_on takes Steering / Ablation as generate and contrastive do, and its cached
    path equals a full forward with the same interventions attached."""
    data = tiny_chat_records(6, seed=4)
    kinds = _kinds(model)
    chosen = [kinds["steering"], kinds["ablation"], kinds["lora"]]
    cached = loss_on(model, data, chosen, batch_size=3)
    with interventions_applied(model, chosen):
        full = loss_on(model, data, batch_size=3)  # hooks already attached: full forwards
    assert cached == pytest.approx(full, rel=1e-5)
    assert cached != pytest.approx(loss_on(model, data, batch_size=3), rel=1e-3)
    assert loss_on(model, data, chosen, scale=0.0, batch_size=3) == pytest.approx(loss_on(model, data, batch_size=3), rel=1e-6)


def test_normaliser_names_the_culprit(model):
    vec = em.SteeringVector(model, layer=1)
    assert as_interventions(None) == [] and as_interventions(()) == []
    with pytest.raises(AdapterError, match=r"adapters\[1\] is a str"):
        as_interventions([vec, "vec"])
    with pytest.raises(AdapterError, match=r"adapters\[1\] is a object"):
        loss_on(model, tiny_chat_records(2), [vec, object()])
    with pytest.raises(AdapterError, match="adapters of type int"):
        as_interventions(3)


def test_direction_that_does_not_fit_is_refused(model):
    wrong = Direction(torch.ones(8), layer=1)
    with pytest.raises(GeometryError, match="d_model=8"):
        Steering(wrong, 1.0).hooks(model)
    with pytest.raises(GeometryError, match="d_model=8"):
        loss_on(model, tiny_chat_records(2), Ablation(wrong))


# --- one positions vocabulary ------------------------------------------------------------------------
def test_forward_positions_refuse_answer_with_a_hint(model):
    vec = em.SteeringVector(model, layer=1)
    for name in ("answer", "prompt"):
        with pytest.raises(AdapterError, match=rf"positions='{name}'.*assistant_mask"):
            vec.applied(model, positions=name).__enter__()
        with pytest.raises(AdapterError, match=rf"positions='{name}'"):
            Steering(_direction(model), 1.0, positions=name).hooks(model)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_old_training_token_names_warn_and_mean_answer():
    with pytest.warns(DeprecationWarning, match="ce_tokens='assistant' is deprecated; use 'answer'"):
        cfg = TrainConfig(ce_tokens="assistant")
    assert cfg.ce_tokens == "answer" and cfg.kl_tokens == "answer"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TrainingError, match="kl_tokens='prompt'"):
        TrainConfig(kl_tokens="prompt")


def test_loss_on_old_token_name_warns_and_means_answer(model):
    data = tiny_chat_records(4, seed=5)
    with pytest.warns(DeprecationWarning, match="tokens='assistant' is deprecated"):
        old = loss_on(model, data, tokens="assistant")
    assert old == loss_on(model, data, tokens="answer")
    assert old != pytest.approx(loss_on(model, data, tokens="all"), rel=1e-4)
    with pytest.raises(GeometryError, match="loss_on: tokens='last'"):
        loss_on(model, data, tokens="last")
