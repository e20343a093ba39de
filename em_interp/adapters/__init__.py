"""Adapters as TransformerLens hooks: steering vectors and rank-k LoRA."""

from em_interp.adapters.base import Adapter, load_adapter
from em_interp.adapters.lora import LORA_SITES, LoRA
from em_interp.adapters.steering import STEERING_HOOKS, SteeringSet, SteeringVector

__all__ = ["LORA_SITES", "STEERING_HOOKS", "Adapter", "LoRA", "SteeringSet", "SteeringVector", "load_adapter"]
