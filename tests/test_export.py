"""Export to PEFT (LoRA directories) and llama.cpp (control-vector GGUF), checked against the real readers."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from em_interp.adapters import LoRA, SteeringVector
from em_interp.adapters.export import (
    control_vector_index,
    export_control_vector,
    export_peft,
    lora_from_peft,
    read_control_vector,
)
from em_interp.errors import AdapterError

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning thread pools crawl on a busy CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def _hooked(model, adapter, tokens):
    with torch.no_grad(), adapter.applied(model):
        return model(tokens)


def _peft_logits(hf, directory, tokens):
    import copy

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(directory)).eval()
    with torch.no_grad():
        return peft_model(tokens).logits


# --- PEFT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_matches_hooks(pair, tokens, tmp_path, rslora):
    model, hf = pair
    lora = LoRA(model, layer=[1, 3], rank=3, site=["mlp_out", "attn_q", "attn_v"], alpha=6.0, rslora=rslora, init="random")
    lora.scale = 1.5  # folded into B on export
    out = lora.export_peft(tmp_path / "peft", "tiny-base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6 and config["use_rslora"] is rslora
    assert config["layers_to_transform"] == [1, 3] and config["base_model_name_or_path"] == "tiny-base"
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight" in set(f.keys())
        assert len(list(f.keys())) == 2 * 2 * 3
    torch.testing.assert_close(_peft_logits(hf, out, tokens), _hooked(model, lora, tokens), atol=1e-4, rtol=0)


def test_peft_round_trip(pair, tokens, tmp_path):
    model, _ = pair
    lora = LoRA(model, layer=[0, 2], rank=2, site=["attn_out", "mlp_gate", "attn_k"], alpha=4.0, rslora=True, init="random")
    export_peft(lora, tmp_path / "peft")
    back = LoRA.from_peft(tmp_path / "peft", model)
    assert (back.layers, back.rank, back.alpha, back.rslora) == ([0, 2], 2, 4.0, True)
    assert sorted(back.sites) == sorted(lora.sites)
    for key in lora.A:
        torch.testing.assert_close(back.A[key], lora.A[key], atol=0, rtol=0)
        torch.testing.assert_close(back.B[key], lora.B[key], atol=0, rtol=0)
    torch.testing.assert_close(_hooked(model, back, tokens), _hooked(model, lora, tokens), atol=1e-6, rtol=0)
    assert back.provenance["source"] == "peft"


def test_reads_adapter_written_by_peft(pair, tokens, tmp_path):
    """A directory written by PEFT itself (rank 4, rsLoRA, chosen layers) loads and gives PEFT's logits."""
    import copy

    model, hf = pair
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                             layers_to_transform=[1, 2], init_lora_weights=False)
    torch.manual_seed(0)
    peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(tmp_path / "theirs")
    lora = lora_from_peft(tmp_path / "theirs", model)
    assert lora.layers == [1, 2] and lora.rank == 4 and lora.rslora
    torch.testing.assert_close(_hooked(model, lora, tokens), _peft_logits(hf, tmp_path / "theirs", tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj"], "use_dora": True}, "use_dora"),
    ],
)
def test_unsupported_peft_adapters(pair, tmp_path, kwargs, named):
    import copy

    model, hf = pair
    peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, **kwargs)).save_pretrained(tmp_path / "x")
    with pytest.raises(AdapterError, match=named):
        lora_from_peft(tmp_path / "x", model)


def test_unsupported_tensor_key_is_named(pair, tmp_path):
    model, _ = pair
    lora = LoRA(model, layer=1, rank=1, init="random")
    out = export_peft(lora, tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "adapter_model.safetensors"))
    state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(1, 64)
    save_file(state, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"lm_head"):
        lora_from_peft(out, model)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        lora_from_peft(tmp_path, model)


# --- llama.cpp control vectors ---------------------------------------------------------------------
def _fields(path):
    reader = gguf.GGUFReader(str(path))
    f = reader.fields

    def text(key):
        return bytes(f[key].parts[f[key].data[0]]).decode()

    return reader, text


def test_export_gguf_reads_back(pair, tmp_path):
    model, _ = pair
    vec = SteeringVector(model, layer=2, init="random", alpha=4.0)
    vec.scale = 0.5
    path = vec.export_gguf(tmp_path / "vec.gguf")
    reader, text = _fields(path)
    assert text("general.architecture") == "controlvector"
    assert text("controlvector.model_hint") in ("llama", "qwen2")
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 1
    assert [t.name for t in reader.tensors] == ["direction.2"]
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.asarray(tensor.data), (2.0 * vec.vector.detach()).numpy(), rtol=0, atol=1e-7)
    directions, meta = read_control_vector(path)
    assert list(directions) == [2] and meta["layer_count"] == 1 and meta["architecture"] == "controlvector"


def test_layer_numbering(pair):
    model, _ = pair
    assert control_vector_index(SteeringVector(model, layer=3)) == 3
    assert control_vector_index(SteeringVector(model, layer=3, hook="resid_pre")) == 2
    assert control_vector_index(SteeringVector(model, layer=3, hook="mlp_out")) == 3  # Llama/Qwen2: no post-MLP norm
    for bad in (SteeringVector(model, layer=0), SteeringVector(model, layer=1, hook="resid_pre")):
        with pytest.raises(AdapterError, match="block 0"):
            control_vector_index(bad)
    with pytest.raises(AdapterError, match="resid_mid"):
        control_vector_index(SteeringVector(model, layer=2, hook="resid_mid"))


def test_set_of_vectors_and_mapping(pair, tmp_path):
    model, _ = pair
    a = SteeringVector(model, layer=2, init="random", seed=1)
    b = SteeringVector(model, layer=3, hook="resid_pre", init="random", seed=2, alpha=3.0)  # -> direction.2 too
    c = SteeringVector(model, layer=3, init="random", seed=3)
    path = export_control_vector([a, b, c], tmp_path / "set.gguf", model_hint="qwen2")
    reader, text = _fields(path)
    assert text("controlvector.model_hint") == "qwen2"
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(data) == ["direction.2", "direction.3"]
    np.testing.assert_allclose(data["direction.2"], (a.vector + 3.0 * b.vector).detach().numpy(), atol=1e-6)
    mapping = {1: torch.ones(64), 3: np.full(64, 2.0, dtype=np.float64)}
    directions, _ = read_control_vector(export_control_vector(mapping, tmp_path / "map.gguf"))
    assert list(directions) == [1, 3] and float(directions[3][0]) == 2.0
    with pytest.raises(AdapterError, match="direction.0"):
        export_control_vector({0: torch.ones(64)}, tmp_path / "bad.gguf")
    with pytest.raises(AdapterError, match="mapping key '2' is a str"):
        export_control_vector({"2": torch.ones(64)}, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_llamacpp_semantics_match_our_hooks(pair, tokens, tmp_path):
    """Emulate llama.cpp (direction.N added to decoder layer N's output) on the plain HF model."""
    model, hf = pair
    vecs = [SteeringVector(model, layer=2, init="random", alpha=3.0, seed=5),
            SteeringVector(model, layer=2, hook="resid_pre", init="random", alpha=2.0, seed=6),
            SteeringVector(model, layer=3, hook="mlp_out", init="random", alpha=2.0, seed=7)]
    directions, _ = read_control_vector(export_control_vector(vecs, tmp_path / "v.gguf"))
    strength = 0.8  # --control-vector-scaled v.gguf 0.8
    handles = [hf.model.layers[n].register_forward_hook(lambda mod, args, out, d=d: out + strength * d)
               for n, d in directions.items()]
    try:
        with torch.no_grad():
            emulated = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    attached = [v.attach(model, scale=strength) for v in vecs]
    try:
        with torch.no_grad():
            ours = model(tokens)
    finally:
        for h in attached:
            h.remove()
    torch.testing.assert_close(ours, emulated, atol=1e-4, rtol=0)
