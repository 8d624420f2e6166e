"""TorchScript functions differentiated the same way at every step, whatever ran before in the process.

sam3's losses call TorchScript functions (GIoU, box IoU, the contrastive alignment). TorchScript's
graph executor differentiates a function's first (profiling) call per op, as eager autograd does,
and once it has optimised the function, through symbolic derivatives that round differently. The
optimised plan is kept for the rest of the process, and `torch.jit.optimized_execution(False)`
does not reach a function already optimised: a prediction, a loss test or an earlier training in
the same process then changed the gradients of every later step (a resumed run drifted from an
uninterrupted one). Each step therefore drops the functions' cached plans and runs them unoptimised.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


def loaded_script_functions() -> tuple[torch.jit.ScriptFunction, ...]:
    """Every TorchScript function bound at module level in the modules imported so far."""
    found: dict[int, torch.jit.ScriptFunction] = {}
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            # type(), not isinstance: isinstance reads `__class__`, which deprecated proxies warn on
            if type(value) is torch.jit.ScriptFunction:
                found[id(value)] = value
    return tuple(found.values())


@contextlib.contextmanager
def unoptimized_script_execution(functions: tuple[torch.jit.ScriptFunction, ...]) -> Iterator[None]:
    """Run `functions` (and any other TorchScript) from a fresh, unoptimised plan inside this block."""
    for function in functions:
        function._debug_flush_compilation_cache()
    with torch.jit.optimized_execution(False):
        yield
