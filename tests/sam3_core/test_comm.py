"""The process group's timeouts: the gloo group takes `train.dist_timeout_s`, a barrier may wait longer.

Two gloo ranks in spawned processes. Under nccl, Python objects go through a gloo twin of the
default group; it is made here by the same function, which cannot reach nccl on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from sam3_core import comm
from tests.fixtures.network import free_port

# long enough for two processes of a busy machine to join the group (joining waits this long too)
GROUP_TIMEOUT_S = 10
# rank 0 arrives this late at a barrier: past the group's timeout, within the barrier's own
LATE_S = GROUP_TIMEOUT_S + 5
BARRIER_TIMEOUT_S = 60


def _timeout_s(group: Any) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    comm.init_process_group(GROUP_TIMEOUT_S)
    record: dict[str, Any] = {"twin_timeout_s": _timeout_s(comm._gloo_twin())}
    comm.barrier()
    if rank == 0:
        time.sleep(LATE_S)
    comm.barrier(timeout_s=BARRIER_TIMEOUT_S)
    record["late_rank_within_the_barrier_timeout"] = "passed"
    record["group_timeout_after"] = _timeout_s(torch.distributed.group.WORLD)
    if rank == 0:
        time.sleep(LATE_S)
    try:
        comm.barrier()
        record["late_rank_past_the_group_timeout"] = "passed"
    except RuntimeError:
        record["late_rank_past_the_group_timeout"] = "timed out"
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    os._exit(0)  # the group is broken by the timeout: leave without tearing it down


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("comm")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.integration
def test_the_gloo_group_for_objects_takes_the_configured_timeout_not_torchs_30_minutes(records) -> None:
    assert [r["twin_timeout_s"] for r in records] == [GROUP_TIMEOUT_S] * 2


@pytest.mark.integration
def test_a_barrier_with_its_own_timeout_waits_for_a_late_rank_and_restores_the_groups(records) -> None:
    assert [r["late_rank_within_the_barrier_timeout"] for r in records] == ["passed"] * 2
    assert [r["group_timeout_after"] for r in records] == [GROUP_TIMEOUT_S] * 2


@pytest.mark.integration
def test_a_plain_barrier_gives_up_after_the_groups_timeout(records) -> None:
    # rank 1 waits for rank 0, which comes LATE_S later: after the group's timeout
    assert records[1]["late_rank_past_the_group_timeout"] == "timed out"
