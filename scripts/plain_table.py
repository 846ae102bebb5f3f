"""The proof table of issue 10: gamma ranking with bias folding (today's method) against the same
ranking with reconstruction (data ranking by default), on the fixtures trained without the L1 penalty (fixtures/plain/).

    python scripts/plain_table.py [--models vgg resnet] [--targets 0.7 0.5]

Calibration: the 256 training-distribution samples of ``fixtures/plain/calibration.npz``;
evaluation: the 1,000 held-out samples of ``fixtures/heldout.npz`` (accuracy against the
labels, top-1 agreement with the unpruned model). The tool's own check runs on the first 64
held-out samples (never used for fitting). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxslim_bn import prune

PLAIN = Path(__file__).resolve().parent.parent / "fixtures" / "plain"
FORMS = {"kept": "{}.onnx", "folded": "{}.ts-folded.onnx"}


def logits(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 250]})[0] for i in range(0, len(x), 250)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["vgg", "resnet", "densenet", "mobilenetv2"])
    parser.add_argument("--forms", nargs="*", default=list(FORMS))
    parser.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5])
    parser.add_argument("--methods", nargs="*", default=["gamma+bias", "data+reconstruct"],
                        help="IMPORTANCE+COMPENSATION pairs (gamma|data, bias|reconstruct)")
    parser.add_argument("--round-to", default="auto", help="channel rounding passed to prune (default auto)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    calib = np.load(PLAIN / "calibration.npz")["input"].astype(np.float32)
    held = np.load(PLAIN.parent / "heldout.npz")
    x, y = held["input"].astype(np.float32), held["label"]
    data = {"input": np.concatenate([calib, x[:64]])}  # 256 calibrate, 64 held-out samples check
    print("| model | export | budget (MACs kept) | MACs kept | method | accuracy | agreement | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for form in args.forms:
            path = PLAIN / FORMS[form].format(name)
            ref = logits(str(path), x).argmax(1)
            print(f"| {name} | {form} | unpruned | 100% | - | {(ref == y).mean():.1%} | 100% | - |", flush=True)
            for target in args.targets:
                for method in args.methods:
                    try:
                        result = prune(str(path), target_macs=target, data=data, calibration_samples=len(calib),
                                       importance=method.split("+")[0], compensation=method.split("+")[1],
                                       round_to=args.round_to if args.round_to == "auto" else int(args.round_to))
                    except Exception as exc:  # a table row, not a crash: say what failed
                        why = str(exc).splitlines()[0][:80]
                        print(f"| {name} | {form} | {target:.0%} | - | {method} | failed: {why} | | |")
                        continue
                    pred = logits(result.model, x).argmax(1)
                    secs = sum(v for k, v in result.report.seconds.items() if k in ("prune", "reconstruct")
                               or k.startswith("step"))
                    macs = result.report.after.macs / result.report.before.macs
                    print(f"| {name} | {form} | {target:.0%} | {macs:.1%} | {method} | {(pred == y).mean():.1%} | "
                          f"{(pred == ref).mean():.1%} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
