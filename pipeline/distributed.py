"""Run a component on several processes with torchrun and hand rank 0's outputs back.

torchrun's workers are separate processes (in a PyTorchJob, separate pods), so the dict a
component's `execute()` returns cannot come back as a Python value. Every rank runs
`python -m pipeline.distributed --outputs URI <component> <overrides>`; rank 0 writes its outputs as
JSON to URI (a local file inside one pod, the object store across the pods of a PyTorchJob),
which the launcher reads once torchrun or the job has finished. The ranks' RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR come from torchrun and are never set here.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.dispatch import component_module
from sam3_core import comm, storage
from sam3_core.errors import Sam3PipeError

logger = logging.getLogger(__name__)

ENTRY_MODULE = "pipeline.distributed"


class DistributedRunError(Sam3PipeError):
    """torchrun (or a rank under it) failed; the ranks' own logs above say why."""


def rank_command(component: str, overrides: list[str], outputs_uri: str) -> list[str]:
    """The torchrun arguments after the launcher's own flags: run `component` as a module on every rank."""
    return ["-m", ENTRY_MODULE, "--outputs", outputs_uri, component, *overrides]


def torchrun_command(component: str, overrides: list[str], outputs_uri: str, nproc_per_node: int) -> list[str]:
    """A single-pod torchrun: N workers on this machine, rendezvous on a local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        *rank_command(component, overrides, outputs_uri),
    ]


def run_in_pod(component: str, overrides: list[str], nproc_per_node: int) -> dict[str, Any]:
    """Run a component here: in-process for one worker, else under torchrun; return rank 0's outputs."""
    if nproc_per_node <= 1:
        return component_module(component).execute(overrides)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-ranks-") as tmp:
        outputs_uri = str(Path(tmp) / "outputs.json")
        command = torchrun_command(component, overrides, outputs_uri, nproc_per_node)
        logger.info("launching %d workers: %s", nproc_per_node, " ".join(command))
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0:
            raise DistributedRunError(
                f"{component}: torchrun exited with code {returncode}; the rank logs above say why"
            )
        if not storage.exists(outputs_uri):
            raise DistributedRunError(f"{component}: torchrun succeeded but rank 0 wrote no outputs to {outputs_uri}")
        return storage.read_json(outputs_uri)


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank: run the component, and on global rank 0 publish its outputs."""
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", required=True, help="URI where rank 0 writes the component's outputs as JSON")
    parser.add_argument("component", help="component to run on this rank (train, predict)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides of the component")
    args = parser.parse_args(argv)
    rank = comm.launch_env().rank
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    outputs = component_module(args.component).execute(args.overrides)
    if rank == 0:
        storage.write_json(args.outputs, outputs)
        logger.info("outputs of %s written to %s", args.component, args.outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
