"""The package version (one place; `em_interp.__version__` re-exports it)."""

__version__ = "0.1.0"
