"""Time and peak memory of reconstruction on a large model (issue 10: a ResNet-50-sized model,
256 samples at 224x224, 2 cores; aim under 60 s and 4 GB; issue 18: 1,000 samples cost no more
memory than 256). Measures, asserts nothing.

    python fixtures/resnet50.py out/resnet50.onnx        # needs torch (the fixtures extra)
    python scripts/reconstruct_bench.py out/resnet50.onnx [--samples 256] [--max-positions 16]

The model is pruned first (bias folding, no check); then :func:`reconstruct` runs on seeded
N(0, 1) samples (time does not depend on the values) in this process, and the peak resident
memory of the whole process is read from the kernel afterwards.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import numpy as np
import onnx

from onnxslim_bn import prune
from onnxslim_bn.passes.reconstruct import STORE_BYTES, reconstruct


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max-positions", type=int, default=64)
    parser.add_argument("--max-rows", type=int, default=16384, help="cap on the rows of one layer's fit (the library default)")
    parser.add_argument("--no-downstream", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    original = onnx.load(args.model)
    clock = time.perf_counter()
    pruned = prune(original, ratio=args.ratio, verify=False, compensation="bias",
                   input_shapes={original.graph.input[0].name: [1, 3, args.size, args.size]}).model
    print(f"pruned at ratio {args.ratio} in {time.perf_counter() - clock:.1f} s")
    x = np.random.default_rng(0).standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
    before = rss_mb()
    clock = time.perf_counter()
    cpu = time.process_time()
    _, report = reconstruct(original, pruned, {original.graph.input[0].name: x}, max_positions=args.max_positions,
                            downstream=not args.no_downstream, max_rows=args.max_rows)
    cpu = time.process_time() - cpu
    seconds = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fit = sum(f.seconds for f in report.layers)
    print(f"reconstruct: {seconds:.1f} s ({fit:.1f} s in the {len(report.layers)} refits, "
          f"{report.seconds_original:.1f} s running the original, {report.seconds_pruned:.1f} s the pruned model), "
          f"{len(report.skipped)} skipped, {report.levels} levels; process peak RSS {peak:.0f} MB "
          f"(before reconstruct {before:.0f} MB); {args.samples} samples, at most {args.max_positions} positions "
          f"per sample and {args.max_rows} rows per layer; CPU time {cpu:.0f} s (all threads); "
          f"{report.spilled_bytes / 2**20:.0f} MB of activations went through files (past "
          f"{STORE_BYTES // 2**20} MB in memory)")


if __name__ == "__main__":
    main()
