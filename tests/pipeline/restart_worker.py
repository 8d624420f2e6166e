"""A training process for test_pytorchjob_launcher's restart test: the first rank 1 fails, once.

Each process that joins the process group leaves a file `OUT_DIR/rank<r>-pid<pid>`. Once both
are connected (a first barrier), the first process with rank 1 exits with an error while rank 0
waits for it at a second barrier, as a rank waits inside a collective for a peer that died; it
would wait up to `WAIT_S`, longer than the test lasts.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch.distributed as dist

WAIT_S = 900


def main(out: str) -> int:
    rank = int(os.environ["RANK"])
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
