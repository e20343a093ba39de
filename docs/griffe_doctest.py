"""Griffe extension for the docs build: show doctest lines (`>>>`) as code.

Google-style docstrings in em_interp put short `>>>` examples in the description, outside an "Examples:"
section; Markdown would render them as nested block quotes and read `x[0]["key"]` as a link. This wraps
each run of doctest lines (and their output lines) in a ```pycon fence, without `# doctest:` flags.
"Examples:" sections are left to griffe, which already renders them as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLES = re.compile(r"^(\s*)Examples:\s*$")
_FLAGS = re.compile(r"\s*#\s*doctest:.*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_doctests(text: str) -> str:
    """Return `text` with every doctest block outside an "Examples:" section fenced."""
    lines = text.splitlines()
    out: list[str] = []
    examples_at: int | None = None
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if examples_at is not None and stripped and _indent(line) <= examples_at:
            examples_at = None
        match = _EXAMPLES.match(line)
        if match:
            examples_at = len(match.group(1))
        if examples_at is None and not in_fence and stripped.startswith(">>>"):
            pad = line[: _indent(line)]
            block = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) == len(pad):
                block.append(_FLAGS.sub("", lines[i][len(pad) :]))
                i += 1
            out += [f"{pad}```pycon", *(pad + b for b in block), f"{pad}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence doctest lines in every docstring once the object is loaded."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
