"""Shared fixtures live in tests/fixtures/, one module per real service or data set the tests use.

Two tiers: `make test-fast` runs the units (`-m "not integration"`), `make test` everything. A test
is in the integration tier when it carries `@pytest.mark.integration` (it starts processes or trains)
or asks for one of the `INTEGRATION_FIXTURES` (a server or a pipeline run), marked here.

Every test session runs in an isolated environment (tests/fixtures/isolation.py): the MLflow
store, the object store, the local state folder and the download cache of this process and of
every subprocess live in one temporary folder. The session fails if the checkout's own
`.sam3pipe/` changed while it ran.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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
CHECKOUT_STATE = Path(__file__).resolve().parents[1] / ".sam3pipe"
_STATE = pytest.StashKey[tuple[Path, isolation.Snapshot]]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before any test module, fixture or subprocess: all default state goes to a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="sam3pipe-test-state-"))
    isolation.apply(root)
    config.stash[_STATE] = (root, isolation.snapshot(CHECKOUT_STATE))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
