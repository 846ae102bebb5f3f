"""The four-way tables of `--quantize int8` on the sparsity-trained fixtures: held-out accuracy and
latency of FP32, slim, INT8 alone and slim + INT8, in onnxruntime and OpenVINO (the INT8 IR its
ONNX reader makes of the QDQ model), batch 1 and 32. Numbers, not tests: nothing is asserted.

    python bench/int8.py [--fixtures resnet,vgg] [--threshold 1e-3] [--round-to auto] [--runs 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxslim_bn import prune, save_model
from onnxslim_bn.app.bench import FOUR_WAY, FOUR_WAY_LABELS, benchmark_four_way
from onnxslim_bn.ir.openvino_ir import available as openvino_available
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
    args = parser.parse_args()
    if args.plain:
        return plain_table()
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
