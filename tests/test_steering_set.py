"""SteeringSet (several layers of one hook): hooks, training, save/load, GGUF export, and the imports
`from_gguf` (validated like llama.cpp's loader) and `from_repeng` (duck-typed ControlVector), with round trips."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import em_interp as em
from em_interp.adapters import SteeringSet, SteeringVector, load_adapter
from em_interp.adapters.export import export_control_vector, from_gguf, from_repeng, read_control_vector
from em_interp.errors import AdapterError

D = 64  # tiny d_model


class StandInControlVector:
    """What repeng's `ControlVector` dataclass holds: `model_type` and `directions: dict[int, np.ndarray]`."""

    def __init__(self, model_type, directions):
        self.model_type = model_type
        self.directions = directions

    def export_gguf(self, path):
        """repeng 0.4's `ControlVector.export_gguf`, line for line."""
        arch = "controlvector"
        writer = gguf.GGUFWriter(path, arch)
        writer.add_string(f"{arch}.model_hint", self.model_type)
        writer.add_uint32(f"{arch}.layer_count", len(self.directions))
        for layer in self.directions.keys():
            writer.add_tensor(f"direction.{layer}", self.directions[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _stand_in(model_type="llama", layers=(1, 2, 3), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return StandInControlVector(model_type, {n: rng.standard_normal(D).astype(dtype) for n in layers})


def _write(path, tensors, hint="llama", layer_count="auto"):
    writer = gguf.GGUFWriter(str(path), "controlvector")
    if hint is not None:
        writer.add_string("controlvector.model_hint", hint)
    if layer_count is not None:
        writer.add_uint32("controlvector.layer_count", len(tensors) if layer_count == "auto" else layer_count)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model, tokens, *adapters, scale=None):
    handles = [a.attach(model, scale=scale) for a in adapters]
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for h in handles:
            h.remove()


# --- the set itself ----------------------------------------------------------------------------------
def test_set_equals_its_vectors_applied_together(pair, tokens):
    model, _ = pair
    steering = SteeringSet(model, layers=[3, 1], init="random", alpha=4.0, seed=2)
    steering.scale = 0.5
    assert steering.layers == [1, 3] and steering.first_layer == 1
    assert steering.hook_names == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    singles = steering.split(model)
    assert [v.layer for v in singles] == [1, 3] and all(v.alpha == 4.0 and v.scale == 0.5 for v in singles)
    torch.testing.assert_close(_logits(model, tokens, steering), _logits(model, tokens, *singles), atol=0, rtol=0)
    assert not torch.allclose(_logits(model, tokens, steering), _logits(model, tokens))
    # layers are seeded independently, and norm covers all layers
    assert not torch.allclose(steering.vectors["L1"], steering.vectors["L3"])
    expected = float(torch.cat([4.0 * steering.vectors["L1"], 4.0 * steering.vectors["L3"]]).detach().norm())
    assert steering.norm == pytest.approx(expected, rel=1e-6)


def test_set_init_mapping_and_bad_arguments(pair):
    model, _ = pair
    given = {-1: torch.ones(D), 2: torch.full((D,), 2.0)}
    steering = SteeringSet(model, layers=[2, -1], init=given)
    assert steering.layers == [2, 3] and float(steering.vectors["L3"][0].detach()) == 1.0
    with pytest.raises(AdapterError, match="exactly"):
        SteeringSet(model, layers=[1, 2], init={1: torch.ones(D)})
    with pytest.raises(AdapterError, match="out of range"):
        SteeringSet(model, layers=[1, 9])
    with pytest.raises(AdapterError, match="twice"):
        SteeringSet(model, layers=[3, -1])
    with pytest.raises(AdapterError, match="non-empty list"):
        SteeringSet(model, layers=2)
    with pytest.raises(AdapterError, match="hook="):
        SteeringSet(model, layers=[1], hook="resid_side")
    with pytest.raises(AdapterError, match=r"shape \(3,\)"):
        SteeringSet(model, layers=[1], init={1: torch.ones(3)})


def test_set_save_and_load(pair, tmp_path, tokens):
    model, _ = pair
    steering = SteeringSet(model, layers=[0, 2], hook="mlp_out", init="random", alpha=2.0)
    steering.scale = 3.0
    loaded = load_adapter(steering.save(tmp_path / "set"), model)
    assert isinstance(loaded, SteeringSet) and loaded.layers == [0, 2] and loaded.hook == "mlp_out"
    assert loaded.alpha == 2.0 and loaded.scale == 3.0
    torch.testing.assert_close(_logits(model, tokens, loaded), _logits(model, tokens, steering), atol=0, rtol=0)


def test_set_trains_every_layer(tiny, records):
    steering = SteeringSet(tiny, layers=[1, 3], alpha=8.0)
    run = em.train(steering, tiny, records, steps=4, lr=1e-2, batch_size=4, warmup_steps=1, progress=False)
    assert all(float(v.norm()) > 0 for v in steering.vectors.values())  # both started at zero
    assert run.losses[-1]["ce"] < run.losses[0]["ce"]


# --- export and imports ------------------------------------------------------------------------------
def test_round_trip_em_gguf_em(pair, tmp_path, tokens):
    model, _ = pair
    steering = SteeringSet(model, layers=[1, 2, 3], init="random", alpha=3.0, seed=4)
    steering.scale = 0.5
    path = steering.export_gguf(tmp_path / "set.gguf")
    back = from_gguf(path, model)
    assert isinstance(back, SteeringSet) and back.layers == [1, 2, 3] and back.hook == "resid_post"
    diff = max(float((back.deltas()[n] - d).abs().max()) for n, d in steering.deltas().items())
    assert diff == 0.0  # float32 written, float32 read
    torch.testing.assert_close(_logits(model, tokens, back), _logits(model, tokens, steering), atol=1e-6, rtol=0)
    assert back.provenance["source"] == "gguf" and back.provenance["model_hint"] in ("llama", "qwen2")
    # the classmethod is the same import; a single exported SteeringVector reads back as a one-layer set
    vec = SteeringVector(model, layer=2, hook="resid_pre", init="random", alpha=2.0)
    one = SteeringSet.from_gguf(vec.export_gguf(tmp_path / "one.gguf"), model)
    assert one.layers == [1] and torch.equal(one.deltas()[1], vec.delta(1.0).detach())


def test_round_trip_repeng_gguf_em(pair, tmp_path, tokens):
    model, _ = pair
    model_type = "llama" if "llama" in model.em_model_id else "qwen2"
    cv = _stand_in(model_type, layers=(3, 1, 2))
    cv.export_gguf(str(tmp_path / "repeng.gguf"))
    via_file = from_gguf(tmp_path / "repeng.gguf", model)
    direct = from_repeng(cv, model)
    assert via_file.layers == direct.layers == [1, 2, 3]
    for n, array in cv.directions.items():
        assert np.array_equal(via_file.deltas()[n].detach().numpy(), array)
        assert np.array_equal(direct.deltas()[n].detach().numpy(), array)
    assert direct.provenance == {"source": "repeng", "model_type": model_type}
    # and back out: our export of the imported set equals repeng's own file
    ours, _ = read_control_vector(export_control_vector(direct, tmp_path / "again.gguf"))
    theirs, _ = read_control_vector(tmp_path / "repeng.gguf")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_repeng_semantics_match_our_hooks(pair, tokens):
    """Emulate repeng's ControlModel (directions[N] · coeff added to model.layers[N]'s output) on the HF model."""
    model, hf = pair
    cv = _stand_in("llama" if "llama" in model.em_model_id else "qwen2", layers=(0, 2))
    coeff = 1.5
    def add(d):
        return lambda mod, args, out: (out[0] + coeff * d, *out[1:]) if isinstance(out, tuple) else out + coeff * d

    handles = [hf.model.layers[n].register_forward_hook(add(torch.from_numpy(d))) for n, d in cv.directions.items()]
    try:
        with torch.no_grad():
            emulated = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_logits(model, tokens, from_repeng(cv, model), scale=coeff), emulated, atol=1e-4, rtol=0)


def test_from_repeng_refusals(pair):
    model, _ = pair
    with pytest.raises(AdapterError, match="expected a repeng ControlVector"):
        from_repeng({"directions": {}}, model)
    with pytest.raises(AdapterError, match="model_type='gemma2'"):
        from_repeng(_stand_in("gemma2"), model)
    with pytest.raises(AdapterError, match="outside this model's blocks"):
        from_repeng(_stand_in(layers=(1, 4)) if "llama" in model.em_model_id else _stand_in("qwen2", (1, 4)), model)
    model_type = "llama" if "llama" in model.em_model_id else "qwen2"
    bad = StandInControlVector(model_type, {1: np.ones(D + 1, dtype=np.float32)})
    with pytest.raises(AdapterError, match=r"direction 1 has shape \(65,\)"):
        from_repeng(bad, model)
    with pytest.raises(AdapterError, match="dtype int64"):
        from_repeng(StandInControlVector(model_type, {1: np.ones(D, dtype=np.int64)}), model)
    with pytest.raises(AdapterError, match="int layer indices"):
        from_repeng(StandInControlVector(model_type, {"1": np.ones(D, dtype=np.float32)}), model)
    # float64 arrays (e.g. after numpy arithmetic) are converted
    steering = from_repeng(StandInControlVector(model_type, {2: np.full(D, 0.25)}), model)
    assert steering.vectors["L2"].dtype == torch.float32 and float(steering.vectors["L2"][0]) == 0.25


@pytest.mark.parametrize(
    "tensors, kwargs, message",
    [
        ({"direction.0": np.ones(D, np.float32), "direction.1": np.ones(D, np.float32)}, {}, "direction.0"),
        ({"direction.1": np.ones(D, np.float64)}, {}, "type F64; expected F32"),
        ({"direction.1": np.ones(D, np.float16)}, {}, "type F16; expected F32"),
        ({"direction.1": np.ones((2, D), np.float32)}, {}, r"shape .*expected 1-D"),
        ({"direction.1": np.ones(D, np.float32), "direction.2": np.ones(D - 1, np.float32)}, {}, "different sizes"),
        ({"direction.1": np.ones(D, np.float32)}, {"layer_count": 2}, "layer_count=2; expected 1"),
        ({"direction.1": np.ones(D, np.float32)}, {"layer_count": None}, "layer_count=None"),
        ({"bias.1": np.ones(D, np.float32)}, {}, "'bias.1'"),
        ({}, {}, "no direction.N tensors"),
    ],
)
def test_gguf_refused_like_llamacpp(tmp_path, tensors, kwargs, message):
    path = _write(tmp_path / "cv.gguf", tensors, **kwargs)
    with pytest.raises(AdapterError, match=message):
        read_control_vector(path)


def test_from_gguf_checks_the_model(pair, tmp_path):
    model, _ = pair
    hint = "llama" if "llama" in model.em_model_id else "qwen2"
    with pytest.raises(AdapterError, match="model_hint='gemma2' is for another architecture"):
        from_gguf(_write(tmp_path / "a.gguf", {"direction.1": np.ones(D, np.float32)}, hint="gemma2"), model)
    with pytest.raises(AdapterError, match=r"direction 4 is outside this model's blocks 0..3"):
        from_gguf(_write(tmp_path / "b.gguf", {"direction.4": np.ones(D, np.float32)}, hint=hint), model)
    with pytest.raises(AdapterError, match=r"direction 1 has shape \(32,\)"):
        from_gguf(_write(tmp_path / "c.gguf", {"direction.1": np.ones(32, np.float32)}, hint=hint), model)
    with pytest.raises(AdapterError, match="general.architecture='llama'"):
        writer = gguf.GGUFWriter(str(tmp_path / "d.gguf"), "llama")
        writer.add_tensor("direction.1", np.ones(D, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        from_gguf(tmp_path / "d.gguf", model)
    # no hint at all is accepted (llama.cpp never reads it); HF model_type names are accepted as hints (repeng)
    assert from_gguf(_write(tmp_path / "e.gguf", {"direction.2": np.ones(D, np.float32)}, hint=None), model).layers == [2]


def test_real_repeng_if_installed(pair, tmp_path):
    repeng = pytest.importorskip("repeng")
    model, _ = pair
    model_type = "llama" if "llama" in model.em_model_id else "qwen2"
    cv = repeng.ControlVector(model_type=model_type, directions=_stand_in(model_type).directions)
    cv.export_gguf(str(tmp_path / "real.gguf"))
    assert from_gguf(tmp_path / "real.gguf", model).layers == from_repeng(cv, model).layers == [1, 2, 3]
