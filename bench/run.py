"""`make bench`: prune every fixture, every architecture fixture and a ResNet-50-sized model at
default settings, time each pair with `onnx-bnslim bench`'s method in onnxruntime and OpenVINO at
batch 1 and 32, the four-way table (FP32, slim, INT8 alone, slim + INT8) of the ResNet-50-sized
model with group-consistent dead channels at batch 1 and 8, and write BENCHMARKS.md. Numbers,
not tests: nothing is asserted."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from onnxslim_bn import prune, save_model
from onnxslim_bn.app.bench import RUNTIMES, BenchResult, benchmark, benchmark_four_way
from onnxslim_bn.hardware import channel_block
from onnxslim_bn.ir.openvino_ir import available as openvino_available
from onnxslim_bn.ir.shapes import infer_shapes, resolve_input_shapes
from onnxslim_bn.passes.latency import TableStats, layer_latency_table, layer_shapes, predicted_ms
from onnxslim_bn.passes.quantize import quantize_files

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
FIXTURES = ("vgg", "resnet", "densenet", "mobilenetv2")
ARCH = ("efficientnet", "grouped", "mobilenetv3", "shufflenet", "unet", "yolo")
ARCH_RATIO = 0.4  # fixtures/architectures.py kills this fraction of every BN's channels
# small models (0.1-10 ms): 30 runs of 0.1 ms are 3 ms of evidence, and one compiled OpenVINO model of
# 0.1 ms ran up to 25% off another compile of the same file: more time per round and more rounds
SMALL_MIN_SECONDS = 0.25  # each round of a row timed at least this long
SMALL_ROUNDS = 8  # rounds (sessions built afresh) for the small models
CALIBRATION = 64  # seeded N(0,1) samples for the four-way case: prune --data splits them 32 / 32
FOUR_WAY_BATCHES = (1, 8)
FOUR_WAY_REPEATS = 2  # the four-way table timed this many times, one after the other


@dataclass
class Case:
    name: str
    path: Path
    ratio: float
    runs: int
    options: dict


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    ov = "not installed"
    if openvino_available():
        import openvino
        ov = openvino.__version__.split("-")[0]
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, OpenVINO {ov}")


def tool_cost(model: Path, out: Path) -> dict:
    """The CLI's own time and peak memory on ``model`` (no verification), each in a fresh process."""
    def peak_mb(code: str) -> float:
        code += "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        return int(done.stdout.split()[-1]) / 1024
    baseline = peak_mb("import onnxslim_bn.app.cli, onnxruntime")
    report = out.with_suffix(".json")
    args = [str(model), "--ratio", "0.5", "--no-verify", "--no-probe", "-o", str(out), "--report", str(report)]
    peak = peak_mb(f"import onnxslim_bn.app.cli, onnxruntime\nassert onnxslim_bn.app.cli.main({args!r}) == 0")
    data = json.loads(report.read_text())
    seconds = (data.get("result") or data).get("seconds", {})  # the report, possibly inside an envelope
    return {"model_mb": model.stat().st_size / 2**20, "baseline_mb": baseline, "peak_mb": peak, **seconds}


DATA_SAMPLES = 256  # the data run on the ResNet-50-sized model: seeded N(0,1) samples at 224x224
DATA_TARGET = 0.7
DATA_SECTION = "## A data run on the ResNet-50-sized model"


def data_run_cost(model: Path, out: Path) -> dict:
    """Issue 17's benchmark: `onnx-bnslim MODEL --target-macs 0.7 --data NPZ` (256 samples at 224x224,
    everything else default: the refit, the check) in a child process; its wall time, its CPU time
    (user + system) and its peak RSS as the child's getrusage gives them, with the load average
    before and after. Nothing is asserted."""
    data = out / f"{model.stem}.data{DATA_SAMPLES}.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.savez(data, input=rng.standard_normal((DATA_SAMPLES, 3, 224, 224), dtype=np.float32))
    pruned, report = out / f"{model.stem}.data.onnx", out / f"{model.stem}.data.json"
    args = [str(model), "--target-macs", str(DATA_TARGET), "--data", str(data), "-o", str(pruned),
            "--report", str(report)]
    # a fresh interpreter (not a fork of this big parent) that reports its own peak RSS and CPU time
    code = (f"import resource, onnxslim_bn.app.cli as cli\ncode = cli.main({args!r})\n"
            "use = resource.getrusage(resource.RUSAGE_SELF)\n"
            "print(code, use.ru_utime + use.ru_stime, use.ru_maxrss)")
    load = os.getloadavg()[0]
    clock = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - clock
    status, cpu, peak = done.stdout.split()[-3:]
    if status != "0":
        raise SystemExit(f"the data run exited {status}: {done.stderr.strip().splitlines()[-1:]}")
    found = json.loads(report.read_text())
    found = found.get("result") or found
    return {"wall": wall, "cpu": float(cpu), "peak_mb": int(peak) / 1024, "load_before": load, "load_after": os.getloadavg()[0],
            "seconds": found.get("seconds", {}), "importance": found.get("options", {}).get("resolved", {}).get("importance"),
            "compensation": found.get("options", {}).get("resolved", {}).get("compensation"), "samples": DATA_SAMPLES,
            "macs": (found.get("before", {}).get("macs"), found.get("after", {}).get("macs"))}


def data_run_lines(cost: dict) -> list[str]:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in cost["seconds"].items() if isinstance(v, (int, float)))
    before, after = cost["macs"]
    macs = f"MACs {before:,} -> {after:,}; " if before and after else ""
    return [DATA_SECTION, "",
            f"`onnx-bnslim resnet50.onnx --target-macs {DATA_TARGET} --data` {cost['samples']} seeded N(0,1) samples "
            f"at 224x224 (importance {cost['importance']}, compensation {cost['compensation']}, the check on), in a "
            f"fresh process: {cost['wall']:.1f} s wall, {cost['cpu']:.1f} s CPU (user + system), peak RSS "
            f"{cost['peak_mb']:.0f} MB; {macs}load average (1 min) {cost['load_before']:.1f} before and "
            f"{cost['load_after']:.1f} after, on {os.cpu_count()} cores. Stages (the report's seconds): {stages}.", ""]


def write_data_section(lines: list[str]) -> None:
    """``--only data``: put the data run's section into BENCHMARKS.md in place of its old one
    (before the INT8 section when there was none), leaving the rest as the last full run wrote it."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    if DATA_SECTION in text:
        start = text.index(DATA_SECTION)
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    else:
        start = end = next((i for i, line in enumerate(text) if line.startswith("## Slim + INT8")), len(text))
    path.write_text("\n".join(text[:start] + lines + text[end:]) + "\n")


def speed(row) -> str:
    return f"{row.speedup:.2f}x ({row.efficiency:.2f})"


def summary(done: list[tuple[Case, object, BenchResult]]) -> list[str]:
    """One line per model: speed-up and its share of the MAC ideal per runtime and batch."""
    cols = [(r.runtime, r.batch) for r in done[0][2].rows] if done else []
    head = ["Model", "Ratio", "Ideal (MACs)", *[f"{rt} b{b}" for rt, b in cols], "Slower than original"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, result, timing in done:
        rows = {(r.runtime, r.batch): r for r in timing.rows}
        # slower: beyond the row's A/A band; a median below 1.0 inside the band is noise
        slower = [f"{rt} b{b}" if r.verdict == "slower"
                  else f"({rt} b{b} within noise: {r.speedup:.2f}x, {r.band.describe()})"
                  for (rt, b), r in rows.items() if r.speedup < 1.0]
        cells = [case.name, "-" if case.ratio is None else f"{case.ratio}", f"{timing.rows[0].ideal:.2f}x" if timing.rows else "-",
                 *[speed(rows[c]) if c in rows else "-" for c in cols], ", ".join(slower) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def conv_traffic(path: Path, batch: int) -> tuple[float, float]:
    """MACs and activation bytes (every Conv's input + output, fp32) of the model at ``batch``."""
    model = onnx.load(str(path))
    given = {k: [batch, *v[1:]] for k, v in resolve_input_shapes(model, {}, str(path))[0].items()}
    shapes = infer_shapes(model, given, str(path))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = nbytes = 0.0
    for node in model.graph.node:
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if node.op_type != "Conv" or node.input[1] not in weights or not x or not y:
            continue
        if not all(isinstance(d, int) for d in [*x, *y]):
            continue
        macs += float(np.prod(weights[node.input[1]])) * y[0] * float(np.prod(y[2:]))
        nbytes += 4.0 * (np.prod(x) + np.prod(y))
    return macs, nbytes


def traffic_line(original: Path, pruned: Path, batch: int) -> str:
    """Why a runtime can fall short of the MAC ratio: the activations the convs read and write."""
    (m0, b0), (m1, b1) = conv_traffic(original, batch), conv_traffic(pruned, batch)
    return (f"Conv activations at batch {batch} (input + output, fp32): {b0 / 1e9:.2f} -> {b1 / 1e9:.2f} GB "
            f"({b0 / b1:.2f}x fewer bytes for {m0 / m1:.2f}x fewer MACs): memory-bound layers speed up by the bytes, "
            "not the MACs.")


def latency_check(original: Path, pruned: Path, batch: int) -> str:
    """Build the onnxruntime latency table of ``original`` (no cache: its real cost) and compare
    the speed-up it predicts for ``pruned`` with nothing else (the bench's measurement is beside it)."""
    model = onnx.load(str(original))
    shapes = infer_shapes(model, resolve_input_shapes(model, {}, str(original))[0], str(original))
    stats = TableStats()
    curves = layer_latency_table(model, shapes, runtime="onnxruntime", batch=batch, cache=False, stats=stats)
    small = onnx.load(str(pruned))
    small_shapes = infer_shapes(small, resolve_input_shapes(small, {}, str(pruned))[0], str(pruned))
    widths = {n: (s.c_in, s.c_out) for n, s in layer_shapes(small, small_shapes, batch).items() if n in curves}
    full, cut = predicted_ms(curves), predicted_ms(curves, widths)
    return (f"Latency table (onnxruntime, batch {batch}, cache off): {stats.layers} layers, {stats.shapes} distinct "
            f"shapes timed in {stats.seconds:.1f} s; the layers alone sum to {full:.2f} ms for the original and "
            f"{cut:.2f} ms at the pruned widths: a predicted {full / cut:.2f}x.")


def four_way(runtimes: tuple[str, ...], runs: int, rounds: int) -> list[str]:
    """Issue 19's proof: the ResNet-50-sized model with group-consistent dead channels,
    `--ratio 0.5 --quantize int8 --data CALIB`, and INT8 alone quantized as bench --quantize does
    (the same calibration share, the same nodes kept in FP32), timed side by side
    ``FOUR_WAY_REPEATS`` times; the load average beside each table."""
    model = ROOT / "out" / "resnet50c.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "resnet50.py"), str(model), "--consistent"], check=True)
    calib = OUT / "resnet50c.calib.npz"  # N(0,1): enough to time and to check exactness, not accuracy
    np.savez(calib, input=np.random.default_rng(0).standard_normal((CALIBRATION, 3, 224, 224), dtype=np.float32))
    clock = time.perf_counter()
    result = prune(str(model), ratio=0.5, quantize="int8", data=str(calib))
    seconds = time.perf_counter() - clock
    files = {"fp32": model, "slim": OUT / "resnet50c.slim.onnx", "slim_int8": OUT / "resnet50c.slim.int8.onnx"}
    save_model(result.fp32_model, files["slim"])
    save_model(result.model, files["slim_int8"])
    report, quantization = result.report, result.report.quantization
    kept = quantization["excluded_nodes"]
    files["int8"] = quantize_files({"int8": model}, str(calib), OUT, fallback=kept)[0]["int8"]
    steps = quantization["steps"]
    lines = ["## Slim + INT8: the ResNet-50-sized model with group-consistent dead channels", "",
             "`fixtures/resnet50.py --consistent` (50% dead channels, the same ones in every BN of a residual "
             f"stream, gamma and beta ~0 there), `--ratio 0.5 --quantize int8 --data` {CALIBRATION} seeded N(0,1) "
             "samples (32 calibrate, 32 check; N(0,1) serves timing and exactness, not accuracy), "
             f"{seconds:.0f} s wall. MACs {report.before.macs:,} -> {report.after.macs:,}; "
             f"{report.removed_channels} channels removed; kept in FP32 by `--int8-fp32 auto`: "
             f"{', '.join(kept) or 'none'}. INT8 alone: the original quantized the same way, the same nodes in FP32.",
             "", "| Step | top-1 agreement | cosine | max rel. error |", "|---|---|---|---|"]
    lines += [f"| {name} | {steps[key]['top1_agreement']:.1%} | {steps[key]['cosine']:.6f} | {steps[key]['max_rel_diff']:.3g} |"
              for key, name in (("pruning", "original -> slim (FP32)"), ("quantization", "slim -> slim + INT8"),
                                ("total", "original -> slim + INT8"))]
    for repeat in range(FOUR_WAY_REPEATS):
        load = os.getloadavg()[0]
        timing = benchmark_four_way(files, FOUR_WAY_BATCHES, runs=runs, runtimes=runtimes, rounds=rounds, progress=True)
        lines += ["", f"Run {repeat + 1} of {FOUR_WAY_REPEATS}, load average (1 min) {load:.1f} before and "
                  f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores, {timing.threads} threads:", "",
                  timing.table(markdown=True)]
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model on the small models")
    parser.add_argument("--big-runs", type=int, default=12, help="timed runs per model on the ResNet-50-sized model")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the runs are spread over (even: each model "
                        "holds the first slot as often)")
    parser.add_argument("--min-seconds", type=float, default=SMALL_MIN_SECONDS,
                        help="small models: each round of a row timed at least this long (more runs)")
    parser.add_argument("--small-rounds", type=int, default=SMALL_ROUNDS,
                        help="small models: rounds, each with sessions built afresh")
    parser.add_argument("--only", nargs="+", help="only these model names (for a quick look; resnet50c: the four-way "
                        "slim + INT8 case; data: the data run on the ResNet-50-sized model alone, its section of "
                        "BENCHMARKS.md rewritten in place)")
    parser.add_argument("--budget-min", type=float, default=17.0,
                        help="wall-clock budget: past 60%% of it, the remaining models get a third of the runs")
    args = parser.parse_args()
    clock = time.perf_counter()
    loads = [os.getloadavg()[0]]
    OUT.mkdir(parents=True, exist_ok=True)
    big = ROOT / "out" / "resnet50.onnx"
    if not big.exists():
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "resnet50.py"), str(big)], check=True)
    block, why = channel_block()
    runtimes = tuple(r for r in RUNTIMES if r != "openvino" or openvino_available())

    if args.only == ["data"]:
        write_data_section(data_run_lines(data_run_cost(big, OUT)))
        print(f"wrote the data run into {ROOT / 'BENCHMARKS.md'}")
        return
    cost = tool_cost(big, OUT / "resnet50.cost.onnx")  # first: a child forked from a big parent counts its pages
    data_cost = data_run_cost(big, OUT) if not args.only or "data" in args.only else None
    small = args.min_seconds
    cases = [Case(n, ROOT / "fixtures" / f"{n}.onnx", r, args.runs, {}) for n in FIXTURES for r in (0.3, 0.5, 0.7)]
    cases += [Case(n, ROOT / "fixtures" / "arch" / f"{n}.onnx", ARCH_RATIO, args.runs, {}) for n in ARCH]
    cases += [Case("resnet50", big, 0.5, args.big_runs, {}),
              Case("resnet50 (--round-to 1)", big, 0.5, args.big_runs, {"round_to": 1})]
    # --target-latency 0.5 per runtime, then MAC-based selection at the MACs it reached, side by side
    cases += [Case(f"resnet50 (--target-latency 0.5, {rt})", big, None, args.big_runs,
                   {"target_latency": 0.5, "runtime": rt}) for rt in runtimes]
    if args.only:
        cases = [c for c in cases if c.name.split()[0] in args.only]
    done, sections, extra, reduced = [], [], [], []
    int8 = four_way(runtimes, args.big_runs, args.rounds) if not args.only or "resnet50c" in args.only else []
    loads.append(os.getloadavg()[0])
    for case in cases:
        if time.perf_counter() - clock > 0.6 * args.budget_min * 60 and case.runs > 4:
            case.runs = max(4, case.runs // 3)  # a busy machine: finish in time, and say so
            reduced.append(case.name)
        result = prune(str(case.path), ratio=case.ratio, **case.options)
        stem = case.name.split()[0] + "".join(f".{k}{v}" for k, v in case.options.items())
        pruned = OUT / f"{stem}.r{case.ratio}.onnx"
        if "target_latency" in case.options:  # the same MACs, chosen by MACs: is the latency selection faster?
            kept = round(result.report.after.macs / result.report.before.macs, 4)
            cases.append(Case(f"resnet50 (--target-macs {kept}, vs latency on {case.options['runtime']})", big, None,
                              case.runs, {"target_macs": kept}))
            extra.append(f"{case.name}: " + "; ".join(n for n in result.report.notes if "target-latency" in n))
        save_model(result.model, pruned)
        report = result.report
        print(f"{case.name} ratio {case.ratio}: {report.removed_channels} channels removed", flush=True)
        timing = benchmark(case.path, pruned, batches=(1, 32), runs=case.runs, warmup=3, runtimes=runtimes,
                           rounds=min(args.rounds if case.path == big else args.small_rounds, case.runs),
                           progress=True, min_seconds=0.0 if case.path == big else small)
        done.append((case, result, timing))
        loads.append(os.getloadavg()[0])
        check = report.verification
        head = (f"### {case.name}" + ("" if case.ratio is None else f", ratio {case.ratio}") + "\n\n"
                f"--round-to {report.options.get('round_to', 'default')}; MACs {report.before.macs:,} -> "
                f"{report.after.macs:,}" + (f"; check max |diff| {check.max_abs_diff:.3g}, cosine {check.cosine:.6f}"
                                           if check else "") + "\n"
                + "".join(f"\n{n[0].upper()}{n[1:]}.\n" for n in report.notes
                          if n.startswith("grouped channels kept whole")))
        sections.append(head + "\n" + timing.table(markdown=True) + "\n")
        if case.name == "resnet50":
            sections[-1] += "\n" + traffic_line(case.path, pruned, 32) + "\n"
            extra.append(latency_check(case.path, pruned, 1))
            print(extra[-1], flush=True)
    minutes = (time.perf_counter() - clock) / 60
    text = [
        "# Benchmarks", "",
        f"Written by `make bench` on {datetime.date.today()} in {minutes:.1f} min: {machine()}.", "",
        f"Load average (1 min) sampled after each model: {min(loads):.1f} to {max(loads):.1f}, median "
        f"{sorted(loads)[len(loads) // 2]:.1f}, on {os.cpu_count()} cores" +
        (": other processes were running, so absolute times are inflated and ratios noisier than on an idle "
         "machine; the per-round range (*Rounds*) shows how far one round alone could mislead." 
         if max(loads) > (os.cpu_count() or 1) else "."), "",
        f"`--round-to auto` on this machine: a block of {block} ({why}).", "",
        "How the timings are taken (`onnx-bnslim bench`): one runtime at a time (the other runtime's sessions "
        f"are released); original (A) and pruned (B) alternate A B, B A, ... after 3 warm-up runs of each; "
        "onnxruntime sessions do not spin-wait; rounds with sessions built afresh, the original's first and the "
        f"pruned model's first in turn: {args.rounds} for the ResNet-50-sized model, {args.small_rounds} for the "
        "others, each "
        f"round of their rows timed at least {args.min_seconds:g} s (the fast ones run hundreds of times); "
        "all cores, FP32. "
        "A copy of the original runs beside them, as often: the A/A band (`onnxslim_bn/app/noise.py`). "
        "*Slower than original* lists a row only when its ratio is beyond that band; a median below 1.0x inside "
        "it is shown in parentheses as noise. "
        "Median latency and 10th-90th percentile in ms over all rounds; *Rounds* is the range of the per-round "
        "speed-ups. *Ideal* is the MAC ratio; *measured / ideal* how much of it the runtime delivers. "
        "The machine is shared: compare within one row, not across runs.", "",
        "## Summary: speed-up (measured / ideal)", "",
        *summary(done), "",
        *([f"Runs cut to a third to finish within {args.budget_min:.0f} min (the machine was slow): "
           f"{', '.join(reduced)}.", ""] if reduced else []),
        "## The tool's own cost on the ResNet-50-sized model", "",
        f"{cost['model_mb']:.0f} MB ONNX, ratio 0.5, verification off: load + analyse + prune "
        f"{cost.get('prune', float('nan')):.2f} s, save {cost.get('save', float('nan')):.2f} s; peak RSS "
        f"{cost['peak_mb']:.0f} MB against {cost['baseline_mb']:.0f} MB for the interpreter with the package and "
        f"onnxruntime imported ({(cost['peak_mb'] - cost['baseline_mb']) / cost['model_mb']:.2f}x the model's size "
        "above it).", "",
        *([*extra, ""] if extra else []),
        *(data_run_lines(data_cost) if data_cost else []),
        *int8,
        "## Latency", "", *sections,
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote {ROOT / 'BENCHMARKS.md'} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
