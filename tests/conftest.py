"""Shared fixtures: tiny random models (no network), the embedded model for `slow` tests, seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from em_interp.testing import tiny_chat_records, tiny_model


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
