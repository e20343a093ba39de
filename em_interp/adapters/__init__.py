"""Adapters as TransformerLens hooks: steering vectors and rank-k LoRA."""

# Registers the PEFT / llama.cpp readers and writers behind `vec.export_gguf`, `SteeringSet.from_gguf`, ...
from em_interp.adapters import export  # noqa: E402, I001  (after the classes it imports)
from em_interp.adapters.base import Adapter, load_adapter
from em_interp.adapters.lora import LORA_SITES, LoRA
from em_interp.adapters.steering import STEERING_HOOKS, SteeringSet, SteeringVector

__all__ = ["LORA_SITES", "STEERING_HOOKS", "Adapter", "LoRA", "SteeringSet", "SteeringVector", "export", "load_adapter"]
