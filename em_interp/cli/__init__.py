"""The command line: `em-interp` (`em_interp.cli.command`) and the multi-process sweep (`em_interp.cli.sweep`).

`main` is loaded on first use, so that `python -m em_interp.cli.sweep` (one process per GPU) does not load
the command's modules.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from em_interp.cli.command import main


def __getattr__(name: str) -> Any:
    if name == "main":  # the console script's entry point `em_interp.cli:main`
        from em_interp.cli.command import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main"]
