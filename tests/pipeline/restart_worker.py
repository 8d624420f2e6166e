"""A training process for test_pytorchjob_launcher's restart test: the first rank 1 fails, once.

Each process that joins the process group leaves a file `OUT_DIR/rank<r>-pid<pid>`. Once both
are connected (a first barrier), the first process with rank 1 exits with an error while rank 0
waits for it at a second barrier, as a rank waits inside a collective for a peer that died (gloo
fails it there; nccl would keep it waiting up to `WAIT_S`). After the failure, rank 0 joins late
(`RESTARTED_RANK0_DELAY_S`), as a pod slower to restart does: its peer must wait for the address
the new rank 0 publishes, not connect to the one its first process left in a store.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

WAIT_S = 900
RESTARTED_RANK0_DELAY_S = 3


def main(out: str) -> int:
    rank = int(os.environ["RANK"])
    if rank == 0 and Path(out, "failed").exists():
        time.sleep(RESTARTED_RANK0_DELAY_S)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WAIT_S))
    Path(out, f"rank{rank}-pid{os.getpid()}").touch()
    # both ranks connected before rank 1 fails: a rank that exits while its peer is still connecting
    # fails that peer's process-group set-up instead (a second failure, racing the restart)
    dist.barrier()
    if rank == 1:
        try:
            Path(out, "failed").touch(exist_ok=False)
            return 3
        except FileExistsError:
            pass
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
