"""em_interp: interpretability tools for emergent misalignment research."""

__version__ = "0.1.0"
