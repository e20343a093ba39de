"""Shared fixtures: tiny random models (no network), the embedded model for `slow` tests, seeding."""

from __future__ import annotations

import copy
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
def tiny(_tiny_model_cached):
    """A fresh copy of a tiny random Llama TransformerBridge with a real chat tokenizer."""
    return copy.deepcopy(_tiny_model_cached)


@pytest.fixture
def records():
    return tiny_chat_records()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (slow: first load converts the GGUF)."""
    from em_interp import load_model

    return load_model(device="cpu")
