"""`make bench`: prune the fixtures and a ResNet-50-sized model, time them side by side in
onnxruntime and OpenVINO, and write BENCHMARKS.md. Numbers, not tests: nothing is asserted."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import onnxruntime
import openvino

from onnxslim_bn import prune, save_model
from onnxslim_bn.bench import benchmark

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__.split('-')[0]}")


def tool_cost(model: Path, out: Path) -> dict:
    """The CLI's own time and peak memory on ``model`` (no verification), each in a fresh process."""
    def peak_mb(code: str) -> float:
        code += "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        return int(done.stdout.split()[-1]) / 1024
    baseline = peak_mb("import onnxslim_bn.cli, onnxruntime")
    report = out.with_suffix(".json")
    args = [str(model), "--ratio", "0.5", "--no-verify", "-o", str(out), "--report", str(report)]
    peak = peak_mb(f"import onnxslim_bn.cli, onnxruntime\nassert onnxslim_bn.cli.main({args!r}) == 0")
    seconds = json.loads(report.read_text())["seconds"]
    return {"model_mb": model.stat().st_size / 2**20, "baseline_mb": baseline, "peak_mb": peak, **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model on the fixtures")
    parser.add_argument("--big-runs", type=int, default=10, help="timed runs per model on the ResNet-50-sized model")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    big = ROOT / "out" / "resnet50.onnx"
    if not big.exists():
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "resnet50.py"), str(big)], check=True)

    cost = tool_cost(big, OUT / "resnet50.cost.onnx")  # first: a child forked from a big parent counts its pages
    sections = []
    cases = [(name, ROOT / "fixtures" / f"{name}.onnx", ratio, 8, args.runs)
             for name in ("vgg", "resnet", "densenet", "mobilenetv2") for ratio in (0.3, 0.5, 0.7)]
    cases += [("resnet50", big, 0.5, r, args.big_runs) for r in (1, 8, 16)]
    for name, path, ratio, round_to, runs in cases:
        result = prune(str(path), ratio=ratio, round_to=round_to)
        pruned = OUT / f"{name}.r{ratio}.round{round_to}.onnx"
        save_model(result.model, pruned)
        print(f"{name} ratio {ratio} round-to {round_to}: {result.report.removed_channels} channels removed", flush=True)
        timing = benchmark(path, pruned, batches=(1, 32), runs=runs, warmup=3, progress=sys.stderr.isatty())
        head = (f"### {name}, ratio {ratio}, --round-to {round_to}\n\n"
                f"MACs {result.report.before.macs:,} -> {result.report.after.macs:,}; "
                f"check max |diff| {result.report.verification.max_abs_diff:.3g}, cosine {result.report.verification.cosine:.6f}\n")
        sections.append(head + "\n" + timing.table(markdown=True) + "\n")
    text = [
        "# Benchmarks", "",
        f"Written by `make bench` on {datetime.date.today()}: {machine()}.", "",
        "Original and pruned model run interleaved (A B A B ...) after 3 warm-up runs, all cores, FP32; "
        "median latency and 10th-90th percentile in ms. *Ideal* is the MAC ratio; *measured / ideal* how much of "
        "it the runtime delivers. The machine is shared: compare ratios within one row, not across runs.", "",
        "## The tool's own cost on the ResNet-50-sized model", "",
        f"{cost['model_mb']:.0f} MB ONNX, ratio 0.5, verification off: load + analyse + prune "
        f"{cost['prune']:.2f} s, save {cost['save']:.2f} s; peak RSS {cost['peak_mb']:.0f} MB against "
        f"{cost['baseline_mb']:.0f} MB for the interpreter with the package and onnxruntime imported "
        f"({(cost['peak_mb'] - cost['baseline_mb']) / cost['model_mb']:.2f}x the model's size above it).", "",
        "## Latency", "", *sections,
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
