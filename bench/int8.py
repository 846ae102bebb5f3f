"""The four-way tables of `--quantize int8` on the sparsity-trained fixtures: held-out accuracy and
latency of FP32, slim, INT8 alone and slim + INT8, in onnxruntime and OpenVINO (the INT8 IR its
ONNX reader makes of the QDQ model), batch 1 and 32. Numbers, not tests: nothing is asserted.

    python bench/int8.py [--fixtures resnet,vgg] [--threshold 1e-3] [--round-to auto] [--runs 40]
    python bench/int8.py --nncf [--threads 2]   (`make bench`: writes its section of BENCHMARKS.md)

``--nncf``: the two INT8 OpenVINO IRs of `--quantize int8 --openvino DIR` side by side: NNCF's
(nncf.quantize of the slim FP32 model) and OpenVINO's reading of the onnxruntime QDQ model, with
the FP32 original and the slim model: held-out accuracy and OpenVINO latency in one run.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from sections import write_section  # bench/, beside this script

from onnxslim_bn import prune, save_model
from onnxslim_bn.app.api import to_openvino
from onnxslim_bn.app.bench import FOUR_WAY, FOUR_WAY_LABELS, benchmark_four_way, benchmark_openvino
from onnxslim_bn.ir.openvino_ir import available as openvino_available
from onnxslim_bn.passes.openvino_int8 import available as nncf_available
from onnxslim_bn.passes.quantize import quantize_with_fallback

ROOT = Path(__file__).resolve().parent.parent


def ort_logits(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 100]})[0] for i in range(0, len(x), 100)])


def ov_logits(model: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return np.concatenate([request.infer({"input": x[i : i + 100]})[compiled.outputs[0]] for i in range(0, len(x), 100)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default="vgg,resnet,densenet,mobilenetv2")
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--round-to", default="auto")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--plain", action="store_true",
                        help="instead: the lambda-0 fixtures (fixtures/plain) to --target-macs 0.7 with "
                             "fixtures/plain/calibration.npz, accuracy on all of heldout.npz")
    parser.add_argument("--nncf", action="store_true",
                        help="instead: NNCF's INT8 IR beside the QDQ one read by OpenVINO (writes BENCHMARKS.md's section)")
    parser.add_argument("--threads", type=int, default=2, help="with --nncf: OpenVINO's threads")
    args = parser.parse_args()
    if args.plain:
        return plain_table()
    if args.nncf:
        return nncf_table(args)
    data = np.load(ROOT / "fixtures" / "heldout.npz")
    x, y = data["input"].astype(np.float32), data["label"]
    calib, check, labels = x[:500], x[500:], y[500:]  # as prune --data splits it: the first half calibrates
    runtimes = ("onnxruntime", "openvino") if openvino_available() else ("onnxruntime",)
    acc_rows, time_rows = [], []
    for name in args.fixtures.split(","):
        src = ROOT / "fixtures" / f"{name}.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            result = prune(str(src), threshold=args.threshold, round_to=args.round_to, data={"input": x},
                           quantize="int8", probe=False)
            files = {"fp32": src, "slim": tmp / "slim.onnx", "int8": tmp / "int8.onnx", "slim_int8": tmp / "slim_int8.onnx"}
            save_model(result.fp32_model, files["slim"])
            save_model(result.model, files["slim_int8"])
            kept = result.report.quantization["excluded_nodes"]  # INT8 alone keeps the same nodes in FP32
            save_model(quantize_with_fallback(onnx.load(str(src)), {"input": calib}, str(src), None, kept)[0].model,
                       files["int8"])
            acc = {k: float((ort_logits(p, check).argmax(1) == labels).mean()) for k, p in files.items()}
            ov_acc = {k: float((ov_logits(p, check).argmax(1) == labels).mean()) for k, p in files.items()} \
                if "openvino" in runtimes else {}
            steps = result.report.quantization["steps"]
            acc_rows.append((name, acc, ov_acc, steps, result.report.removed_channels, kept))
            bench = benchmark_four_way(files, tuple(int(b) for b in args.batches.split(",")), runs=args.runs,
                                       runtimes=runtimes, rounds=8, min_seconds=0.25)
            time_rows.append((name, bench))
            print(f"done {name}", flush=True)
    print("\n## Held-out accuracy (500 samples not used for calibration)\n")
    print("| Model | channels removed | " + " | ".join(f"{FOUR_WAY_LABELS[k]} (ORT)" for k in FOUR_WAY)
          + " | INT8 (OV) | Slim + INT8 (OV) | agreement orig->slim+INT8 | kept in FP32 |")
    print("|---" * 10 + "|")
    for name, acc, ov_acc, steps, removed, kept in acc_rows:
        cells = [f"{acc[k]:.1%}" for k in FOUR_WAY] + [f"{ov_acc[k]:.1%}" if ov_acc else "-" for k in ("int8", "slim_int8")]
        print(f"| {name} | {removed} | " + " | ".join(cells) + f" | {steps['total']['top1_agreement']:.1%} | "
              f"{', '.join(kept) or '-'} |")
    for name, bench in time_rows:
        print(f"\n## {name}: latency, median ms (speed-up over FP32), {bench.threads} threads\n")
        print(bench.table(markdown=True))


NNCF_LABELS = {"fp32": "FP32 original", "slim": "Slim (FP32)", "nncf": "Slim + INT8, NNCF IR",
               "qdq": "Slim + INT8, QDQ read by OpenVINO"}
BEGIN, END = "<!-- bench/int8.py --nncf: begin -->", "<!-- bench/int8.py --nncf: end -->"


def nncf_table(args) -> None:
    """Per fixture: `prune --threshold T --quantize int8 --data heldout.npz` (the first 500 calibrate,
    the other 500 check), its INT8 IR made both ways, accuracy on the 500 check samples and
    OpenVINO latency at each batch, the four models alternating in each round."""
    if not nncf_available():
        raise SystemExit("bench/int8.py --nncf needs nncf and openvino: pip install -e '.[test]'")
    import nncf
    import openvino

    data = np.load(ROOT / "fixtures" / "heldout.npz")
    x, y = data["input"].astype(np.float32), data["label"]
    check, labels = x[500:], y[500:]
    batches = tuple(int(b) for b in args.batches.split(","))
    acc_rows, time_rows = [], []
    cuts = [(f"--threshold {args.threshold:g}", {"threshold": args.threshold}), ("--ratio 0.5", {"ratio": 0.5})]
    for name, (cut, how) in ((n, c) for n in args.fixtures.split(",") for c in cuts):
        src = ROOT / "fixtures" / f"{name}.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = {"fp32": src, "slim": tmp / "slim.onnx", "nncf": tmp / "nncf" / "slim.int8.xml",
                     "qdq": tmp / "qdq" / "slim.int8.xml", "qdq_onnx": tmp / "slim.int8.onnx"}
            result = prune(str(src), **how, round_to=args.round_to, data={"input": x}, quantize="int8", probe=False)
            save_model(result.fp32_model, files["slim"])
            save_model(result.model, files["qdq_onnx"])
            nncf_ir = to_openvino(result, tmp / "nncf", "slim.int8", int8_route="nncf")
            qdq_ir = to_openvino(result, tmp / "qdq", "slim.int8", int8_route="qdq")
            acc = {k: float((ov_logits(files[k], check).argmax(1) == labels).mean()) for k in NNCF_LABELS}
            acc["qdq_ort"] = float((ort_logits(files["qdq_onnx"], check).argmax(1) == labels).mean())
            total = result.report.quantization["steps"]["total"]
            acc_rows.append((f"{name} {cut}", result.report.removed_channels, result.report.after.macs / result.report.before.macs,
                             acc, nncf_ir, qdq_ir, total))
            timing = benchmark_openvino({k: files[k] for k in NNCF_LABELS}, src, batches, threads=args.threads,
                                        runs=args.runs, rounds=8, min_seconds=0.25)
            time_rows.append((f"{name} {cut}", timing))
            print(f"done {name} {cut}", flush=True)
    text = [BEGIN, "## Slim + INT8 in OpenVINO: NNCF's INT8 IR beside the QDQ model read by OpenVINO", "",
            f"`python bench/int8.py --nncf` (run by `make bench`), {datetime.date.today()}, NNCF {nncf.__version__}, "
            f"OpenVINO {openvino.__version__}. Each sparse fixture, cut two ways: `prune --threshold {args.threshold:g}` "
            f"(its dead channels) and `--ratio 0.5`, `--round-to {args.round_to} --quantize int8 --data heldout.npz` "
            "(the first 500 samples calibrate both INT8 models, "
            "the other 500 check them and give the accuracy), then `--openvino DIR` both ways: "
            "`--openvino-int8 nncf` (nncf.quantize of the slim FP32 model: preset performance, MinMax ranges, "
            "the run's calibration share) and `--openvino-int8 qdq` (OpenVINO reads the onnxruntime QDQ model). "
            "Every model runs in OpenVINO with FP32 precision for what is not INT8 "
            "(`INFERENCE_PRECISION_HINT f32`, as the tool's check and bench compile).", "",
            "### Held-out accuracy (500 samples not used for calibration) and each IR's check", "",
            "| Model | channels removed | MACs kept | " + " | ".join(NNCF_LABELS.values())
            + " | QDQ in onnxruntime | NNCF IR vs original: agreement, cosine, max rel | "
              "onnxruntime INT8 vs original: agreement, cosine, max rel | NNCF calibration s |",
            "|" + "---|" * 11]
    for name, removed, macs, acc, nncf_ir, qdq_ir, total in acc_rows:
        c = nncf_ir.check
        text.append(f"| {name} | {removed} | {macs:.1%} | " + " | ".join(f"{acc[k]:.1%}" for k in NNCF_LABELS)
                    + f" | {acc['qdq_ort']:.1%} | {c['top1_agreement']:.1%}, {c['cosine']:.5f}, {c['max_rel_diff']:.3f}"
                    f" | {total['top1_agreement']:.1%}, {total['cosine']:.5f}, {total['max_rel_diff']:.3f}"
                    f" | {nncf_ir.quantizer['seconds']:.1f} |")
    text += ["", f"### OpenVINO latency, median ms (speed-up over the FP32 original), {args.threads} threads", "",
             "The four models of a fixture alternate within each of 8 rounds (compiled afresh each round, the first "
             "slot passed on), each round of a row timed at least 0.25 s; the machine is shared: compare within a "
             "row.", "",
             "| Model | Batch | " + " | ".join(NNCF_LABELS.values()) + " | NNCF / QDQ time |", "|" + "---|" * 7]
    for name, timing in time_rows:
        for batch, t in timing.items():
            base = t["fp32"].median_ms
            cells = [f"{t[k].median_ms:.3f}" + ("" if k == "fp32" else f" ({base / t[k].median_ms:.2f}x)")
                     for k in NNCF_LABELS]
            text.append(f"| {name} | {batch} | " + " | ".join(cells)
                        + f" | {t['nncf'].median_ms / t['qdq'].median_ms:.2f} |")
    text.append(END)
    section = "\n".join(text)
    print(section)
    write_section(section, BEGIN, END)


def plain_table() -> None:
    """Ordinary models to a budget: `--target-macs 0.7 --quantize int8 --data calibration.npz`."""
    data = np.load(ROOT / "fixtures" / "heldout.npz")
    x, y = data["input"].astype(np.float32), data["label"]
    calib = ROOT / "fixtures" / "plain" / "calibration.npz"
    print("| Model | FP32 | Slim (FP32) | Slim + INT8 | FP32 -> slim + INT8 (points) | kept in FP32 |")
    print("|---|---|---|---|---|---|")
    for name in ("vgg", "resnet", "densenet", "mobilenetv2"):
        src = ROOT / "fixtures" / "plain" / f"{name}.onnx"
        result = prune(str(src), target_macs=0.7, data=str(calib), quantize="int8", probe=False)
        with tempfile.TemporaryDirectory() as tmp:
            files = {"fp32": src, "slim": Path(tmp) / "slim.onnx", "slim_int8": Path(tmp) / "slim_int8.onnx"}
            save_model(result.fp32_model, files["slim"])
            save_model(result.model, files["slim_int8"])
            acc = {k: float((ort_logits(p, x).argmax(1) == y).mean()) for k, p in files.items()}
        kept = result.report.quantization["excluded_nodes"]
        print(f"| {name} | {acc['fp32']:.1%} | {acc['slim']:.1%} | {acc['slim_int8']:.1%} | "
              f"{100 * (acc['slim_int8'] - acc['fp32']):+.1f} | {len(kept)} |", flush=True)


if __name__ == "__main__":
    main()
