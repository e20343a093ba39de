"""Shared fixtures: tiny random models (no network), the embedded model for `slow` tests, seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from em_interp.model.load import wrap_hf_model
from em_interp.testing import tiny_chat_records, tiny_hf_model, tiny_model

SMALL_VOCAB = 1000  # tiny models for export / import tests: a small vocabulary keeps file I/O fast


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _tiny_model_cached():
    return tiny_model()


@pytest.fixture
def tiny():
    """A fresh tiny random Llama TransformerBridge (seed 0, identical every time) with a real chat tokenizer.

    Built anew rather than deep-copied: building takes ~0.2 s (a deepcopy ~0.4 s), and a copy would carry
    whatever state earlier tests left on the shared model.
    """
    return tiny_model()


@pytest.fixture
def records():
    return tiny_chat_records()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (slow: first load converts the GGUF)."""
    from em_interp import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    """(bridge, independent plain HF model with the same weights), vocabulary `SMALL_VOCAB`."""
    model = wrap_hf_model(tiny_hf_model(request.param, 0, vocab_size=SMALL_VOCAB), None,
                          model_id=f"tiny-{request.param}")
    return model, tiny_hf_model(request.param, 0, vocab_size=SMALL_VOCAB)


@pytest.fixture
def tokens():
    """Two rows of 9 token ids below `SMALL_VOCAB` (seeded)."""
    return torch.randint(5, SMALL_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
