"""`python -m bench gpu --quick` on a machine without CUDA: one line, exit 2, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.paths import REPO


@pytest.mark.integration
def test_the_quick_gpu_check_refuses_a_machine_without_cuda_in_one_line_with_exit_2() -> None:
    # no GPU visible, whatever the machine has
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "gpu", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench gpu --quick needs a CUDA GPU"), proc.stderr
