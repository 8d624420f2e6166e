"""`make bench`: every benchmark in one run, each printing its side-by-side ratios.

`python -m bench [name ...]` runs a subset (names: train, ddp, resume, dumper, evaluate, gpu, data,
tracking, predict). Options after one name go to that benchmark (`python -m bench gpu --quick`); the
exit status is the benchmark's when it gives one.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time

import torch

BENCHMARKS = ("train", "ddp", "resume", "dumper", "evaluate", "gpu", "data", "tracking", "predict")


def main(argv: list[str]) -> int:
    first_option = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:first_option] or list(BENCHMARKS), argv[first_option:]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    if options and len(names) != 1:
        print(f"options {options} go to one benchmark; name exactly one", file=sys.stderr)
        return 2
    if options:
        return importlib.import_module(f"bench.bench_{names[0]}").main(options) or 0
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
