"""The one place that knows the process group: rank, world size, local rank, device, collectives.

`torchrun` and the Kubeflow PyTorchJob operator set RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; they are read here and never written. A plain
`python -m components.<step>` is world size 1, and every collective below is then a no-op, so
callers never branch on "distributed or not".

Collectives follow the backend: under nccl a tensor must live on this rank's GPU, so
`all_reduce_sum` moves it there and back; Python objects (RNG states, COCO results) go through a
gloo group created next to the nccl one, so they never take a round trip through GPU memory.
Both groups wait at most the timeout given to `init_process_group` (`train.dist_timeout_s`) for a
collective; `barrier(timeout_s=...)` waits longer where a rank is known to be busy (rank 0
finishing its checkpoint uploads) without holding anyone inside nccl.

torch is imported inside the functions that need it: the tracking settings ask for the rank
and must stay importable without loading torch (configs embed them).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sam3_core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    import torch.distributed

log = logging.getLogger(__name__)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
DEFAULT_TIMEOUT_S = 1800
_object_group: Any = None
# the timeout the process group was created with; the gloo twin takes the same
_timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process (defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # processes of this run on this machine (they share its cores)
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun)") from None


def launch_env() -> LaunchEnv:
    """The launcher's variables, checked: a rank outside [0, WORLD_SIZE) is a ConfigError.

    A variable the launcher did not set takes its single-process default, and is not checked
    against the others (a lone RANK=1 is a non-zero rank of an unknown world).
    """
    world = _env_int("WORLD_SIZE", 1)
    env = LaunchEnv(
        rank=_env_int("RANK", 0),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
    )
    if env.world_size < 1 or env.rank < 0 or ("WORLD_SIZE" in os.environ and env.rank >= env.world_size):
        raise ConfigError(f"environment: RANK={env.rank} WORLD_SIZE={env.world_size}: need 0 <= RANK < WORLD_SIZE")
    if (
        env.local_world_size < 1
        or env.local_rank < 0
        or ("LOCAL_WORLD_SIZE" in os.environ and env.local_rank >= env.local_world_size)
    ):
        raise ConfigError(
            f"environment: LOCAL_RANK={env.local_rank} LOCAL_WORLD_SIZE={env.local_world_size}: "
            "need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"
        )
    return env


def _dist() -> Any:
    """`torch.distributed` when a default process group is up, else None (torch not loaded: none is up)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def is_initialized() -> bool:
    return _dist() is not None


def rank() -> int:
    """This process's global rank: the process group's when one is up, else the launcher's."""
    dist = _dist()
    return dist.get_rank() if dist else launch_env().rank


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else launch_env().world_size


def local_rank() -> int:
    return launch_env().local_rank


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's compute device: `cuda:<local rank>` (made current) when CUDA is there, else CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchEnv:
    """Join the launcher's group when there is one (nccl on GPU, gloo on CPU); returns the launch env.

    `timeout_s` bounds every collective of the group and of its gloo twin (see `_objects_group`).
    """
    import torch
    import torch.distributed as dist

    global _timeout_s
    env = launch_env()
    if env.distributed and not dist.is_initialized():
        _timeout_s = timeout_s
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group", env.rank, env.world_size, backend)
    return env


def collective_device() -> torch.device:
    """Where a tensor must be for a collective of the default group: this rank's GPU under nccl."""
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gloo_twin() -> Any:
    """A gloo group of every rank, with the process group's timeout (torch's default would be 30 min)."""
    dist = _dist()
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s))


def _objects_group() -> Any:
    """The group for Python objects: the default group under gloo, a gloo twin of it under nccl."""
    global _object_group
    dist = _dist()
    if dist.get_backend() != "nccl":
        return None
    if _object_group is None:
        _object_group = _gloo_twin()
    return _object_group


def barrier(timeout_s: float | None = None) -> None:
    """Wait for every rank, through gloo (never inside nccl); at most `timeout_s` when given, else the group's timeout.

    A longer timeout is for a wait whose length is known to be long, e.g. the other ranks waiting
    for rank 0's last checkpoint uploads at the end of training.
    """
    import torch

    dist = _dist()
    if dist is None:
        return
    group = _objects_group()
    if timeout_s is None:
        dist.barrier(group=group)
        return
    gloo = (group or dist.group.WORLD)._get_backend(torch.device("cpu"))
    before = gloo.options._timeout
    gloo.set_timeout(datetime.timedelta(seconds=timeout_s))
    try:
        dist.barrier(group=group)
    finally:
        gloo.set_timeout(before)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned on the input's device (moved to the backend's device for the collective)."""
    dist = _dist()
    if dist is None:
        return values
    on_backend = values.to(collective_device())
    dist.all_reduce(on_backend)
    return on_backend.to(values.device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(values) / world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_objects_group())
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank `dst` only (None elsewhere)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_objects_group())
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_objects_group())
    return box[0]


def shutdown() -> None:
    """Leave the process group (and its gloo twin), if one is up."""
    global _object_group, _timeout_s
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()
    _object_group = None
    _timeout_s = DEFAULT_TIMEOUT_S


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cores_per_process() -> int:
    """This process's share of the cores it may run on, shared with the run's other processes here; at least 1."""
    return max(1, available_cores() // launch_env().local_world_size)


def default_num_threads() -> int:
    """Torch threads per process when none is configured: OMP_NUM_THREADS if set, else cores / local processes.

    torch's own default is one thread per core in every process; several ranks on one machine
    (or a machine shared with other work) then oversubscribe the cores and a step gets many
    times slower.
    """
    configured = _env_int("OMP_NUM_THREADS", 0)
    if configured > 0:
        return configured
    return cores_per_process()


def set_num_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to `requested`, or to `default_num_threads()` for 0; returns it."""
    import torch

    threads = requested if requested > 0 else default_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
