"""Export adapters to other tools: PEFT LoRA directories and llama.cpp control vectors (GGUF).

PEFT
    `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
    `peft.PeftModel.from_pretrained(hf_model, directory)` loads into the plain HF model, giving the same
    logits as our hooks. Keys are `base_model.model.model.layers.{L}.{module}.lora_A.weight` /
    `lora_B.weight` (module e.g. `mlp.down_proj`); `r`, `lora_alpha` and `use_rslora` reproduce our
    scaling s = alpha/r (alpha/√r with rsLoRA) exactly. `lora_from_peft` reads such a directory back
    (also one written by PEFT itself) without unpickling anything.

llama.cpp control vectors
    A GGUF file with `general.architecture = "controlvector"`, keys `controlvector.model_hint` and
    `controlvector.layer_count`, and float32 tensors `direction.{N}` [d_model]. llama.cpp adds
    `direction.N` (times the `--control-vector-scaled` strength) to the output of block N, 0-based,
    at every token: `cur = ggml_add(cur, ffn_inp); cur = build_cvec(cur, il)` in each model graph
    (src/models/*.cpp), with `tensors[il]` filled from `direction.il` (src/llama-adapter.cpp,
    common/common.cpp). There is no tensor for block 0: `direction.0` is rejected, so N runs from 1 to
    n_layers - 1. Hence `direction.N` = our `blocks.N.hook_resid_post`, and `blocks.N.hook_resid_pre`
    = `direction.{N-1}`. Duplicate indices (several files, or several vectors here) are summed.

Imports
    `from_gguf(path, model)` reads a control-vector GGUF (ours, llama.cpp's `cvector-generator`'s or
    repeng's `export_gguf`) into a `SteeringSet` at `resid_post` of the same block indices, refusing what
    llama.cpp refuses (`direction.0`, tensors that are not 1-D float32, sizes that differ) and what does not
    fit the model. `from_repeng(control_vector, model)` converts a repeng `ControlVector` directly: repeng's
    `directions[N]` is read from `hidden_states[N + 1]` and added to `model.layers[N]`'s output, i.e. block N's
    output, the same index as llama.cpp's `direction.N` and our `blocks.N.hook_resid_post`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp.adapters.base import file_format, model_signature
from em_interp.adapters.lora import LORA_SITES, LoRA, _key
from em_interp.adapters.steering import SteeringSet, SteeringVector
from em_interp.errors import AdapterError, OutputPathError
from em_interp.fileio import atomic_file, write_json

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONTROL_VECTOR_ARCH = "controlvector"
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
# llama.cpp's `general.architecture` for each HF architecture (Mistral converts to "llama").
LLAMACPP_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
# Names a control vector's model hint may carry for each architecture: llama.cpp's, and HF's `model_type`
# (what repeng writes, e.g. "mistral").
_HINTS = {arch: {hint, hf} for (arch, hint), hf in zip(LLAMACPP_ARCH.items(), ("llama", "mistral", "qwen2", "qwen3",
                                                                           "gemma2", "gemma3_text"), strict=True)}
_HINTS["Gemma3ForCausalLM"].add("gemma3")
# Architectures whose block output is resid_mid + mlp_out (no norm after the MLP), so adding to
# hook_mlp_out of block N equals adding to hook_resid_post of block N.
_MLP_OUT_IS_RESID = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
# PEFT options that change what the adapter computes beyond W + s·B·A, with the value meaning "off".
_PEFT_OFF = {"modules_to_save": None, "use_dora": False, "lora_bias": False, "trainable_token_indices": None,
             "layer_replication": None, "target_parameters": None, "alora_invocation_tokens": None,
             "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "use_qalora": False, "use_bdlora": False,
             "arrow_config": None, "velora_config": None, "monteclora_config": None, "kasa_config": None}


# --- PEFT ----------------------------------------------------------------------------------------
def _site_by_module() -> dict[str, str]:
    return {hf_name: site for site, (_, hf_name) in LORA_SITES.items()}


@file_format("export_peft")
def export_peft(lora: LoRA, directory: str | os.PathLike[str], base_model_name: str | None = None) -> Path:
    """Write `lora` as a PEFT LoRA adapter directory (its `scale` is folded into B).

    Args:
        lora: the adapter.
        directory: created if needed; existing PEFT files there are replaced, other files kept.
        base_model_name: `base_model_name_or_path` in the config (default: the model id recorded in the
            adapter, e.g. "Qwen/Qwen2.5-14B-Instruct").

    Returns:
        The directory.

    >>> export_peft(lora, "runs/lora_peft", "Qwen/Qwen2.5-14B-Instruct")  # doctest: +SKIP
    >>> peft.PeftModel.from_pretrained(hf_model, "runs/lora_peft")  # doctest: +SKIP
    """
    tensors: dict[str, Tensor] = {}
    for layer, site in lora.modules():
        key = f"base_model.model.model.layers.{layer}.{LORA_SITES[site][1]}"
        k = _key(layer, site)
        tensors[f"{key}.lora_A.weight"] = lora.A[k].detach().float().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = (lora.B[k].detach().float().cpu() * float(lora.scale)).contiguous()
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or lora.signature.get("model_id"),
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": alpha,
        "use_rslora": bool(lora.rslora),
        "target_modules": sorted({LORA_SITES[s][1].rsplit(".", 1)[-1] for s in lora.sites}),
        "layers_to_transform": list(lora.layers),
        "layers_pattern": "layers",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputPathError(f"export_peft: {directory} is a file; expected a folder for {PEFT_CONFIG} and {PEFT_WEIGHTS}.")
    with atomic_file(directory / PEFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / PEFT_CONFIG, config, indent=2)
    log.info("Wrote PEFT adapter (%d modules, r=%d) to %s", len(lora.modules()), lora.rank, directory)
    return directory


@file_format("lora_from_peft")
def lora_from_peft(directory: str | os.PathLike[str], model: TransformerBridge) -> LoRA:
    """Read a PEFT LoRA directory (ours or PEFT's) into a `LoRA` for `model`.

    Supports LoRA on the decoder layers' q/k/v/o and gate/up/down projections, any rank, rsLoRA and
    several layers. (layer, module) pairs missing from the file get zero factors (ΔW = 0).

    Raises:
        AdapterError: files missing or unreadable; the config asks for something our LoRA cannot
            represent (`modules_to_save`, DoRA, per-module ranks, bias...); a tensor targets another
            module (e.g. `embed_tokens`, `lm_head`); shapes do not fit `model`.
    """
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{directory}: expected {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT LoRA adapter directory).")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc}).") from None
    _check_peft_config(config, config_path)
    state = load_file(str(weights_path))
    sites_by_module = _site_by_module()
    factors: dict[tuple[int, str], dict[str, Tensor]] = {}
    unsupported = []
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None or match.group(2) not in sites_by_module:
            unsupported.append(key)
            continue
        factors.setdefault((int(match.group(1)), sites_by_module[match.group(2)]), {})[match.group(3)] = value
    if unsupported:
        raise AdapterError(
            f"{weights_path}: tensors {', '.join(sorted(unsupported)[:6])} target modules this LoRA cannot represent; "
            f"expected base_model.model.model.layers.{{L}}.<{'|'.join(sorted(sites_by_module))}>.lora_A/lora_B.weight."
        )
    if not factors:
        raise AdapterError(f"{weights_path}: no LoRA tensors found.")
    for (layer, site), pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: layer {layer} {site} has lora_{''.join(pair)} but not both A and B.")
    rank = int(config["r"])
    layers = sorted({layer for layer, _ in factors})
    sites = [s for s in sites_by_module.values() if any(site == s for _, site in factors)]
    lora = LoRA(model, layer=layers, rank=rank, site=sites, alpha=float(config.get("lora_alpha", rank)),
                rslora=bool(config.get("use_rslora", False)), init="zeros")
    with torch.no_grad():
        for (layer, site), pair in factors.items():
            k = _key(layer, site)
            for name, target in (("A", lora.A[k]), ("B", lora.B[k])):
                if tuple(pair[name].shape) != tuple(target.shape):
                    raise AdapterError(
                        f"{weights_path}: layer {layer} {site} lora_{name} has shape {tuple(pair[name].shape)}; "
                        f"expected {tuple(target.shape)} for r={rank} on this model."
                    )
                target.copy_(pair[name].to(target.dtype))
    lora.provenance = {"source": "peft", "path": str(directory), "base_model": config.get("base_model_name_or_path")}
    return lora


def _check_peft_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type={config.get('peft_type')!r}; expected 'LORA'.")
    if "r" not in config:
        raise AdapterError(f"{where}: field 'r' is missing; expected the LoRA rank.")
    for field, off in _PEFT_OFF.items():
        value = config.get(field)
        if value is not None and value != off and value not in ([], {}, False):
            raise AdapterError(f"{where}: {field}={value!r} is not supported; expected {off!r} (plain LoRA).")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        known = {m.rsplit(".", 1)[-1] for m in _site_by_module()}
        bad = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in known)
        if bad:
            raise AdapterError(
                f"{where}: target_modules {bad} are not supported; expected some of {sorted(known)}."
            )


# --- llama.cpp control vectors -------------------------------------------------------------------
def control_vector_index(vector: SteeringVector) -> int:
    """The llama.cpp `direction.N` index at which `vector` acts (see the module docstring).

    Raises:
        AdapterError: the hook has no llama.cpp equivalent (resid_mid, attn_out; mlp_out on models with
            a norm after the MLP), or it is the output of block 0 / input of blocks 0-1, which llama.cpp
            cannot steer.
    """
    return _index(vector.hook, vector.layer, vector.signature.get("architecture"), vector.hook_name)


def _index(hook: str, layer: int, arch: Any, hook_name: str) -> int:
    if hook == "resid_post" or (hook == "mlp_out" and arch in _MLP_OUT_IS_RESID):
        index = layer
    elif hook == "resid_pre":
        index = layer - 1
    else:
        raise AdapterError(
            f"{hook_name}: llama.cpp control vectors add to a block's output only; expected hook "
            f"'resid_post', 'resid_pre', or 'mlp_out' on {sorted(_MLP_OUT_IS_RESID)} (this model: {arch})."
        )
    if index < 1:
        raise AdapterError(
            f"{hook_name}: llama.cpp has no control vector for the output of block 0 (direction.0 is "
            f"rejected); expected resid_post of layer >= 1 or resid_pre of layer >= 2."
        )
    return index


def control_vector_directions(
    vectors: SteeringVector | SteeringSet | Iterable[SteeringVector | SteeringSet] | Mapping[int, Tensor | np.ndarray],
) -> dict[int, Tensor]:
    """Per-index float32 directions {N: [d_model]} as llama.cpp applies them (strength 1).

    Steering vectors contribute their effective delta `scale · alpha · v` (a `SteeringSet`, each of its
    layers'); several at one index are summed. A mapping is taken as {block N: vector added to
    blocks.N.hook_resid_post}.
    """
    if isinstance(vectors, (SteeringVector, SteeringSet)):
        vectors = [vectors]
    out: dict[int, Tensor] = {}
    if isinstance(vectors, Mapping):
        items = []
        for k, v in vectors.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise AdapterError(f"mapping key {k!r} is a {type(k).__name__}; expected an int block index.")
            items.append((int(k), torch.as_tensor(v).detach().float().cpu()))
    else:
        items = []
        for vec in vectors:
            if isinstance(vec, SteeringSet):
                arch = vec.signature.get("architecture")
                items += [(_index(vec.hook, layer, arch, name), delta.detach().float().cpu())
                          for (layer, delta), name in zip(vec.deltas().items(), vec.hook_names, strict=True)]
            elif isinstance(vec, SteeringVector):
                items.append((control_vector_index(vec), vec.delta(vec.scale).detach().float().cpu()))
            else:
                raise AdapterError(f"got a {type(vec).__name__}; expected SteeringVector / SteeringSet objects or a "
                                   f"{{layer: tensor}} mapping.")
    for index, vec in items:
        if index < 1:
            raise AdapterError(f"direction index {index}: llama.cpp indices start at 1 (direction.0 is rejected).")
        if vec.ndim != 1 or not bool(torch.isfinite(vec).all()):
            raise AdapterError(f"direction.{index}: shape {tuple(vec.shape)}; expected a finite 1-D [d_model] vector.")
        out[index] = out[index] + vec if index in out else vec.clone()
    if not out:
        raise AdapterError("no vectors given; expected at least one steering vector or {layer: tensor}.")
    sizes = {v.numel() for v in out.values()}
    if len(sizes) > 1:
        raise AdapterError(f"directions have different sizes {sorted(sizes)}; expected one d_model.")
    return dict(sorted(out.items()))


@file_format("export_control_vector")
def export_control_vector(
    vectors: SteeringVector | SteeringSet | Iterable[SteeringVector | SteeringSet] | Mapping[int, Tensor | np.ndarray],
    path: str | os.PathLike[str],
    model_hint: str | None = None,
) -> Path:
    """Write a llama.cpp control-vector GGUF (`llama-cli -m model.gguf --control-vector PATH`).

    Args:
        vectors: one or more `SteeringVector`s or `SteeringSet`s (hooks resid_post / resid_pre / mlp_out,
            see `control_vector_index`), or {block N: tensor [d_model]} added to blocks.N's output.
        path: the .gguf file (written atomically).
        model_hint: `controlvector.model_hint`, llama.cpp's architecture name ("llama", "qwen2",
            "gemma2"...); default inferred from the steering vectors' model, else "llama". llama.cpp's
            loader does not check it.

    Returns:
        The path. `controlvector.layer_count` is the number of `direction.N` tensors written.
    """
    import gguf

    if not isinstance(vectors, (SteeringVector, SteeringSet, Mapping)):
        vectors = list(vectors)  # read twice below
    directions = control_vector_directions(vectors)
    hint = model_hint or _infer_hint(vectors)
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"export_control_vector: path={str(path)!r} is a folder; pass a file name such as "
                              f"{str(path / 'control_vector.gguf')!r}.")
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", hint)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(directions))
        for index, vec in directions.items():
            writer.add_tensor(f"direction.{index}", vec.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("Wrote control vector %s (directions %s, hint %s)", path, list(directions), hint)
    return path


def read_control_vector(path: str | os.PathLike[str]) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """Read a control-vector GGUF: ({N: float32 [d_model]}, {"architecture", "model_hint", "layer_count"}).

    Validated as llama.cpp's loader does (`common_control_vector_load_one`), plus the layer count.

    Raises:
        AdapterError: not a readable GGUF, `general.architecture` is not "controlvector", a tensor not named
            `direction.N`, `direction.0` (llama.cpp: "invalid (zero) direction tensor layer index"), a tensor
            that is not 1-D or not float32 (float64 is refused, not cast), tensors of different sizes, no
            tensors, or `controlvector.layer_count` missing or different from the number of tensors.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable GGUF file ({exc}).") from None
    meta = {key.split(".", 1)[-1]: _field_value(field) for key, field in reader.fields.items()
            if key in ("general.architecture", f"{CONTROL_VECTOR_ARCH}.model_hint", f"{CONTROL_VECTOR_ARCH}.layer_count")}
    if meta.get("architecture") != CONTROL_VECTOR_ARCH:
        raise AdapterError(f"{path}: general.architecture={meta.get('architecture')!r}; expected 'controlvector'.")
    directions = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise AdapterError(f"{path}: tensor {tensor.name!r}; expected names direction.N.")
        if int(index) == 0:
            raise AdapterError(f"{path}: tensor direction.0; llama.cpp rejects layer index 0 (indices start at 1).")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise AdapterError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}; expected F32 (as llama.cpp).")
        if len([d for d in tensor.shape if d != 1]) > 1:
            raise AdapterError(f"{path}: tensor {tensor.name} has shape {tuple(int(d) for d in tensor.shape)}; expected 1-D.")
        directions[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    if not directions:
        raise AdapterError(f"{path}: no direction.N tensors.")
    sizes = {n: v.numel() for n, v in directions.items()}
    if len(set(sizes.values())) > 1:
        raise AdapterError(f"{path}: direction tensors have different sizes {sizes}; expected one d_model.")
    if meta.get("layer_count") != len(directions):
        raise AdapterError(
            f"{path}: controlvector.layer_count={meta.get('layer_count')!r}; expected {len(directions)} "
            f"(the number of direction tensors)."
        )
    return dict(sorted(directions.items())), meta


@file_format("from_gguf")
def from_gguf(path: str | os.PathLike[str], model: TransformerBridge) -> SteeringSet:
    """A `SteeringSet` for `model` from a llama.cpp control-vector GGUF (`direction.N` → blocks.N.hook_resid_post).

    The vectors are taken as the deltas llama.cpp adds at strength 1 (alpha 1, scale 1), so
    `with steering.applied(model, scale=s)` reproduces `--control-vector-scaled FILE s`.

    Raises:
        AdapterError: anything `read_control_vector` refuses; `controlvector.model_hint` (when the file has one)
            names another architecture than `model`'s; an index N >= the model's layer count; d_model differs.
    """
    directions, meta = read_control_vector(path)
    hint, arch = meta.get("model_hint"), model_signature(model)["architecture"]
    if hint and hint not in _HINTS.get(arch, {hint}):
        raise AdapterError(
            f"{path}: controlvector.model_hint={hint!r} is for another architecture; this model is {arch} "
            f"(hint {' or '.join(map(repr, sorted(_HINTS[arch])))})."
        )
    steering = _steering_set(directions, model, str(path))
    steering.provenance = {"source": "gguf", "path": str(path), "model_hint": hint}
    return steering


@file_format("from_repeng")
def from_repeng(control_vector: Any, model: TransformerBridge) -> SteeringSet:
    """A `SteeringSet` for `model` from a repeng `ControlVector` (duck-typed; repeng need not be installed).

    Reads `control_vector.model_type` (HF model type, checked against `model`) and
    `control_vector.directions` ({N: np.ndarray [d_model]}, added by repeng to block N's output), giving
    vectors at blocks.N.hook_resid_post with alpha 1: `steering.applied(model, scale=s)` adds what repeng's
    `ControlModel.set_control(control_vector, coeff=s)` adds. Float64 arrays are converted to float32.

    Raises:
        AdapterError: the attributes are missing or of another form, the model type differs, an index is
            outside 0..n_layers-1, or a vector is not a finite 1-D array of size d_model.
    """
    model_type, directions = getattr(control_vector, "model_type", None), getattr(control_vector, "directions", None)
    if not isinstance(model_type, str) or not isinstance(directions, Mapping):
        raise AdapterError(
            f"from_repeng: got a {type(control_vector).__name__} with model_type={model_type!r} and directions of "
            f"type {type(directions).__name__}; expected a repeng ControlVector (.model_type str, .directions {{int: array}})."
        )
    arch = model_signature(model)["architecture"]
    if model_type not in _HINTS.get(arch, {model_type}):
        raise AdapterError(f"from_repeng: model_type={model_type!r} but this model is {arch}.")
    vectors = {}
    for key, value in directions.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise AdapterError(f"from_repeng: directions key {key!r}; expected int layer indices.")
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise AdapterError(f"from_repeng: directions[{key}] has dtype {array.dtype}; expected float32.")
        vectors[int(key)] = torch.from_numpy(array.astype(np.float32))
    steering = _steering_set(vectors, model, "from_repeng")
    steering.provenance = {"source": "repeng", "model_type": model_type}
    return steering


def _steering_set(directions: Mapping[int, Tensor], model: TransformerBridge, where: str) -> SteeringSet:
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    if not directions:
        raise AdapterError(f"{where}: no directions; expected at least one layer.")
    for n, vec in directions.items():
        if not 0 <= n < n_layers:
            raise AdapterError(f"{where}: direction {n} is outside this model's blocks 0..{n_layers - 1}.")
        if tuple(vec.shape) != (d_model,) or not bool(torch.isfinite(vec).all()):
            raise AdapterError(f"{where}: direction {n} has shape {tuple(vec.shape)}; expected finite ({d_model},).")
    return SteeringSet(model, layers=sorted(directions), hook="resid_post", init=dict(directions), alpha=1.0)


def _field_value(field: Any) -> Any:
    import gguf

    value = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def _infer_hint(vectors: Any) -> str:
    single = isinstance(vectors, (SteeringVector, SteeringSet))
    candidates = [vectors] if single else [] if isinstance(vectors, Mapping) else list(vectors)
    for vec in candidates:
        hint = LLAMACPP_ARCH.get(str(vec.signature.get("architecture")))
        if hint:
            return hint
    return "llama"


__all__ = [
    "CONTROL_VECTOR_ARCH",
    "LLAMACPP_ARCH",
    "control_vector_directions",
    "control_vector_index",
    "export_control_vector",
    "export_peft",
    "from_gguf",
    "from_repeng",
    "lora_from_peft",
    "read_control_vector",
]
