"""GPU check: a short Ray Train run with runtime.use_gpu and bf16 beside a bare PyTorch loop on the same GPU.

    python -m benchmarks.gpu_check [--pairs 20000] [--epochs 3] [--out FILE]     # from the project root

The same as `python -m benchmarks.throughput --gpu` (benchmarks/throughput.py says what is measured); its
results are in the throughput section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys

from benchmarks.throughput import main

if __name__ == "__main__":
    main(["--gpu", *sys.argv[1:]])
