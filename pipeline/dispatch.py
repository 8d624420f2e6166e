"""Component names -> `components` modules, imported only when a component runs.

Importing a component pulls in torch and sam3 (seconds); `sam3pipe compile` or `submit` never
need them, so the CLI and the launchers import a component's module on demand.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sam3_core.errors import InputError

COMPONENT_MODULES = {
    "data-prep": "data_prep",
    "train": "train",
    "predict": "predict",
    "evaluate": "evaluate",
    "export": "export",
    "compare": "compare",
}


def component_module(component: str) -> ModuleType:
    """The `components.<module>` of a component, by CLI name (`data-prep`) or module name (`data_prep`)."""
    module = COMPONENT_MODULES.get(component, component)
    if module not in COMPONENT_MODULES.values():
        raise InputError(
            "command line", "component", f"unknown component {component!r}; choose one of {sorted(COMPONENT_MODULES)}"
        )
    return importlib.import_module(f"components.{module}")
