"""The project's exception types.

Every error raised by `em_interp` on bad input is an `EmInterpError` (or a subclass) whose message
names *where* the problem is (file and line, field, hook or parameter) and *what was expected*.
"""

from __future__ import annotations


class EmInterpError(Exception):
    """Base class for all errors raised by em_interp."""


class DataError(EmInterpError, ValueError):
    """A dataset file or record is malformed (message names file, line and field)."""


class ModelLoadError(EmInterpError, RuntimeError):
    """A model could not be loaded (missing package, unknown architecture, bad path)."""


class AdapterError(EmInterpError, ValueError):
    """An adapter does not fit a model, or its saved state is inconsistent."""


class TrainingError(EmInterpError, RuntimeError):
    """Training stopped (non-finite loss, bad configuration, broken checkpoint)."""


class JudgeError(EmInterpError, RuntimeError):
    """The LLM judge could not be configured or reached."""


class GeometryError(EmInterpError, ValueError):
    """A vector, direction or trajectory does not fit (shape, d_model, layer, kind) or is degenerate."""


class ConfigError(EmInterpError, ValueError):
    """A configuration file (e.g. the TOML of `em-interp train`) is missing a key, has an unknown one, or a bad value."""


class ReportError(EmInterpError, ValueError):
    """A run dir has no readable results, or a report could not be written."""


class OutputPathError(EmInterpError, ValueError):
    """An output path is the wrong kind (a folder where a file is written, or the reverse), or saving would
    replace something em_interp did not write."""
