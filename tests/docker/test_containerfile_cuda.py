"""The CUDA image can compile Triton's launcher: a C compiler Triton looks for, the C runtime, Python's headers.

On CUDA, sam3's focal loss runs a Triton kernel on every training step, and Triton compiles a
small C launcher with the system compiler when a kernel first runs on a machine (the pinned
Triton looks for $CC, then gcc, then clang). Building the image needs a container engine; this
reads what the Containerfile installs on the image it ships.
"""

from __future__ import annotations

import inspect
import re
import shlex

from tests.fixtures.paths import REPO

CONTAINERFILE = REPO / "docker" / "Containerfile.cuda"


def _final_stage_installs() -> set[str]:
    """Debian packages `apt-get install`ed in the Containerfile's last stage."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    last_stage = re.split(r"^FROM\s", text, flags=re.MULTILINE)[-1]
    packages: set[str] = set()
    for line in last_stage.splitlines():
        if not line.startswith("RUN"):
            continue
        for command in line[3:].split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages.update(word for word in words[2:] if not word.startswith("-"))
    return packages


def test_the_pinned_triton_looks_for_gcc_or_clang() -> None:
    from triton.runtime import build

    source = inspect.getsource(build)
    assert 'shutil.which("gcc")' in source and 'shutil.which("clang")' in source


def test_the_cuda_image_installs_a_c_compiler_triton_finds_and_the_c_runtime_to_link() -> None:
    installed = _final_stage_installs()
    assert installed & {"gcc", "clang"}, installed
    assert "libc6-dev" in installed, installed


def test_the_cuda_image_has_the_python_headers_tritons_launcher_includes_on_either_base() -> None:
    # python:*-slim ships them; Debian's python3 (docker/base.sh) needs python3-dev
    lines = CONTAINERFILE.read_text().replace("\\\n", " ").splitlines()
    run = next(line for line in lines if line.startswith("RUN") and "libc6-dev" in line)
    assert "/Python.h" in run and "python3-dev" in run, run
