"""`make bench`: every benchmark in one run, each printing its side-by-side ratios.

`python -m bench [name ...]` runs a subset (names: train, dumper, evaluate, gpu, data, tracking, demo).
"""

from __future__ import annotations

import importlib
import platform
import sys
import time

import torch

BENCHMARKS = ("train", "dumper", "evaluate", "gpu", "data", "tracking", "demo")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"# sam3pipe benchmarks on {platform.node()}: {torch.get_num_threads()} threads, GPU: {cuda}, torch {torch.__version__}"
    )
    for name in names:
        start = time.perf_counter()
        print(f"\n## {name}")
        importlib.import_module(f"bench.bench_{name}").main()
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
