"""Shared fixtures live in tests/fixtures/, one module per real service or data set the tests use.

Two tiers: `make test-fast` runs the units (`-m "not integration"`), `make test` everything. A test
is in the integration tier when it carries `@pytest.mark.integration` (it starts processes or trains)
or asks for one of the `INTEGRATION_FIXTURES` (a server or a pipeline run), marked here.

`make test` runs on two pytest-xdist workers: each module stays on one worker, so its module
fixtures are built once, and the modules using the session's trained pipelines share one worker, so
those pipelines are trained once (`ModuleScheduling`). Each worker's torch gets one thread: two
workers fill the two cores without oversubscribing them.

Every test session runs in an isolated environment (tests/fixtures/isolation.py): the MLflow
store, the object store, the local state folder and the download cache of this process and of
every subprocess live in one temporary folder. The session fails if the checkout's own
`.sam3pipe/` changed while it ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import isolation

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.datasets",
    "tests.fixtures.mlflow",
    "tests.fixtures.fake_k8s",
]

# fixtures that start a server or run pipelines: every test using one is an integration test
INTEGRATION_FIXTURES = frozenset(
    {
        "s3_server",
        "use_s3_server",
        "s3_bucket",
        "mlflow_server",
        "mlflow_tracking",
        "tracked_pipelines",
        "pipelines",
        "fake_k8s",
        "fake_trainer",
    }
)
# session fixtures that train pipelines, and the modules using them: one worker runs those modules
TRAINED_PIPELINE_FIXTURES = frozenset({"tracked_pipelines", "pipelines"})
TRAINED_PIPELINE_MODULES = frozenset(
    {
        "tests/sam3_core/mlflow_records/test_component_runs.py",
        "tests/sam3_core/mlflow_records/test_mlflow_ui.py",
        "tests/sam3_core/mlflow_records/test_reproduce.py",
    }
)
CHECKOUT_STATE = Path(__file__).resolve().parents[1] / ".sam3pipe"
_STATE = pytest.StashKey[tuple[Path, isolation.Snapshot]]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before any test module, fixture or subprocess: all default state goes to a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="sam3pipe-test-state-"))
    isolation.apply(root)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        isolation.one_thread_per_worker()
    config.stash[_STATE] = (root, isolation.snapshot(CHECKOUT_STATE))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if INTEGRATION_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        module = _module(item.nodeid)
        if TRAINED_PIPELINE_FIXTURES & fixtures and module not in TRAINED_PIPELINE_MODULES:
            raise pytest.UsageError(f"{module} uses the trained pipelines: add it to TRAINED_PIPELINE_MODULES")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole modules per worker, and the trained pipelines' users together (see the module doc)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "trained-pipelines" if module in TRAINED_PIPELINE_MODULES else module

    return ModuleScheduling(config, log)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when the checkout's `.sam3pipe/` is not as it was at the start."""
    root, before = session.config.stash[_STATE]
    changed = isolation.changes(before, isolation.snapshot(CHECKOUT_STATE))
    if changed:
        shown = "\n  ".join(changed[:20])
        session.config.get_terminal_writer().line(
            f"\nERROR: the test session changed {CHECKOUT_STATE} (tests must keep state in tmp folders):\n  {shown}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(root, ignore_errors=True)
