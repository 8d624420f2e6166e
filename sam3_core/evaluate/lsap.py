"""scipy's ``linear_sum_assignment`` without the cost of importing ``scipy.optimize``.

cgF1, HOTA and TETA match with scipy's Hungarian solver, as sam3 does (the same solver gives the
same tie-breaking). The solver is a compiled module of its own (``scipy/optimize/_lsap``) that
needs only numpy, but ``import scipy.optimize`` first runs the package's ``__init__``, which loads
most of scipy (linalg, sparse, special) -- a third of a second, a tenth of the evaluate CLI's
whole budget. So the compiled module is loaded from its file; if scipy ever moves it, the public
import is used instead.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


@functools.cache
def _solver() -> Callable[..., Any]:
    import scipy

    for path in sorted((Path(scipy.__file__).parent / "optimize").glob("_lsap.*")):
        if not any(path.name.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            continue
        loader = importlib.machinery.ExtensionFileLoader("scipy.optimize._lsap", str(path))
        spec = importlib.util.spec_from_file_location("scipy.optimize._lsap", path, loader=loader)
        if spec is None:
            break
        module = importlib.util.module_from_spec(spec)
        try:
            loader.exec_module(module)
        except ImportError:
            break
        return module.linear_sum_assignment
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment


def linear_sum_assignment(cost: Any) -> tuple[Any, Any]:
    """scipy.optimize.linear_sum_assignment(cost): (row indices, column indices) of a minimum-cost matching."""
    return _solver()(cost)
