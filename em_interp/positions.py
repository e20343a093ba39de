"""One vocabulary for token positions, shared by training, generation, interventions and direction extraction.

Named selections (the same words everywhere):

- `"all"`: every real (non-pad) token;
- `"prompt"`: the tokens that are not an answer (system and user turns, template tokens);
- `"answer"`: the assistant answer tokens (each answer's content and its end-of-turn token); while
  generating, the newly generated tokens.

Direction extraction (which *reads* tokens) also knows `"last"` (each row's last real token). Beyond the
names, an int and a Bool `[batch, pos]` mask are accepted where documented: applying an intervention or
generating, an int k means "tokens from position k on"; extracting, it is the index of the one token read.

Where each name applies:

| where | accepted |
| --- | --- |
| `train(ce_tokens=, kl_tokens=)`, `loss_on(tokens=)` | "answer", "all" |
| `generate(positions=)` | "all", "answer", "prompt", int k |
| `adapter.applied(positions=)`, `steer`, `ablate` | "all", int k, Bool mask |
| `mean_diff(positions=)` | "answer", "prompt", "all", "last", int index, mask function |

The old spellings `"assistant"` (training, `loss_on`) and `"generated"` (`generate`) still work and warn
(`DeprecationWarning`); they mean `"answer"`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

ALL = "all"
PROMPT = "prompt"
ANSWER = "answer"
LAST = "last"
NAMES = (ALL, PROMPT, ANSWER)
DEPRECATED = {"assistant": ANSWER, "generated": ANSWER}


def position_name(value: str, allowed: Sequence[str], where: str, error: type[Exception]) -> str:
    """`value` in the shared vocabulary: an old spelling becomes its new name (with a `DeprecationWarning`),
    a name outside `allowed` raises `error` naming `where` (e.g. "loss_on: tokens") and the accepted names."""
    if not isinstance(value, str):
        raise error(f"{where}={value!r}; expected one of {', '.join(map(repr, allowed))} (see em_interp.positions).")
    if value in DEPRECATED:
        new = DEPRECATED[value]
        warnings.warn(f"{where}={value!r} is deprecated; use {new!r} (the same tokens).", DeprecationWarning,
                      stacklevel=3)
        value = new
    if value not in allowed:
        raise error(f"{where}={value!r}; expected one of {', '.join(map(repr, allowed))} (see em_interp.positions).")
    return value
