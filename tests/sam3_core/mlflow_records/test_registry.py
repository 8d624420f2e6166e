"""Registering a checkpoint while another registration of the same model sets the same alias (parallel sweep trials)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from sam3_core.mlflow_records.registry import register_checkpoint

MODEL, ALIAS = "sam3-parallel-trials", "candidate"


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def other_trial_sets_the_alias_first(client: MlflowClient) -> Iterator[list[Any]]:
    """Another trial's version 1, whose registration sets the alias just before ours writes it: between
    the registry's look-up of the alias and its insert, as two trials finishing together do. Yields the
    versions that other registration set the alias to."""
    experiment = client.create_experiment("trials")
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model(MODEL)
    other = client.create_model_version(MODEL, "/store/runs/t0/best.pt", run_id=run_id).version
    set_by_other: list[Any] = []

    def before_flush(session: Session, *_: Any) -> None:
        inserting_alias = any(type(row).__name__ == "SqlRegisteredModelAlias" for row in session.new)
        if inserting_alias and not set_by_other:
            set_by_other.append(other)
            client.set_registered_model_alias(MODEL, ALIAS, other)  # its own session: committed first

    event.listen(Session, "before_flush", before_flush)
    try:
        yield set_by_other
    finally:
        event.remove(Session, "before_flush", before_flush)


def test_an_alias_another_registration_sets_meanwhile_is_set_again_not_refused(
    client: MlflowClient, other_trial_sets_the_alias_first: list[Any]
) -> None:
    run_id = client.search_runs([client.get_experiment_by_name("trials").experiment_id])[0].info.run_id

    version = register_checkpoint(client, MODEL, ALIAS, "/store/runs/t1/best.pt", run_id, "sweep-t1")

    assert [str(v) for v in other_trial_sets_the_alias_first] == ["1"]
    assert str(version.version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, ALIAS).version) == "2"
