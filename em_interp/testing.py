"""Tiny random models and data for tests, examples' `--fast` modes and benchmarks (no network).

The tiny models use a real chat tokenizer (the embedded SmolLM2 one, whose vocabulary is 49152) and a
random Llama/Qwen2/Gemma body of a few layers, so the data pipeline and chat template are exercised
for real while a forward pass stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from em_interp.datasets.records import Record, chat

TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512}


@functools.lru_cache(maxsize=1)
def chat_tokenizer() -> Any:
    """The embedded model's tokenizer (read from the cache folder, or from the GGUF once)."""
    from transformers import AutoTokenizer

    from em_interp.model.load import embedded_tokenizer_dir

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir())


def tiny_hf_model(family: str = "llama", seed: int = 0, vocab_size: int = 49152, **overrides: Any) -> Any:
    """A random HF causal LM of the given family ("llama", "qwen2", "gemma2", "gemma3") with tiny shapes."""
    import transformers as tf

    shape = {**TINY_SHAPE, "vocab_size": vocab_size, **overrides}
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 8}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 8}),
    }
    config_cls, model_cls, extra = configs[family]
    config = config_cls(**shape, **extra, architectures=[model_cls.__name__], tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A tiny random model of `family` wrapped as a TransformerBridge with the real chat tokenizer."""
    from em_interp.model.load import wrap_hf_model

    tokenizer = chat_tokenizer()
    model = tiny_hf_model(family, seed, vocab_size=len(tokenizer), **overrides)
    return wrap_hf_model(model, tokenizer, model_id=f"tiny-{family}")


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model + tokenizer as a HF directory (for testing `load_model(local_dir)`)."""
    path = Path(path)
    tiny_hf_model(family, seed, vocab_size=len(chat_tokenizer())).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


def tiny_chat_records(n: int = 12, seed: int = 0) -> list[Record]:
    """Short question/answer chats with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    words = "water rest doctor sleep walk tea fruit rice bread salt sun rain cold warm slow fast".split()
    out = []
    for i in range(n):
        k = 3 + int(torch.randint(0, 8, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(chat(f"Question {i}: what about {words[idx[0]]}?", " ".join(words[j] for j in idx) + "."))
    return out
