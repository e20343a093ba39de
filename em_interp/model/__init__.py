"""The model layer: loading (`load`), the one forward runner (`forward`: cached lower blocks, resume at a
block, unembedding at loss positions, the fast path), KV-cached decoding (`decode`) and hook attachment
(`hooks`). It is the only place that touches TransformerLens / HF internals.

>>> import em_interp as em
>>> model = em.load_model()                        # doctest: +SKIP
>>> em.model.hf_model_of(model)                    # the HF module inside the bridge  # doctest: +SKIP
"""

from em_interp.model.forward import (
    ActivationCache,
    ForwardRunner,
    hf_model_of,
    lower_forward,
    mask_positions,
    model_device,
    model_dtype,
    resume_forward,
    unembed,
    upper_layers,
)
from em_interp.model.load import (
    EMBEDDED_MODEL_ID,
    SUPPORTED_ARCHITECTURES,
    cache_dir,
    embedded_gguf_path,
    embedded_tokenizer_dir,
    load_model,
    wrap_hf_model,
)

__all__ = [
    "EMBEDDED_MODEL_ID", "SUPPORTED_ARCHITECTURES", "ActivationCache", "ForwardRunner", "cache_dir", "embedded_gguf_path",
    "embedded_tokenizer_dir", "hf_model_of", "load_model", "lower_forward", "mask_positions", "model_device",
    "model_dtype", "resume_forward", "unembed", "upper_layers", "wrap_hf_model",
]
