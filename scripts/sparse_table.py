"""Held-out accuracy and agreement of the sparse fixtures pruned with default settings.

    python scripts/sparse_table.py [--dir fixtures] [--names vgg resnet ...]

For each model (BN kept and TorchScript-folded exports): ``--threshold 1e-3`` and ``--ratio`` at
half, 0.9 and all of its dead fraction (channels below 1e-3 among those the tool ranks), defaults
otherwise (no --data).
Accuracy on ``heldout.npz`` (labelled), agreement = top-1 equal to the original's. Measures,
asserts nothing; the numbers the README quotes for issue 16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxslim_bn import BnSlimError, prune


def predict(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)]).argmax(1)


def timed(path: str, pruned: onnx.ModelProto) -> str:
    """Speed-ups of ``pruned`` over ``path`` (bench.benchmark: alternating, rounds), two table cells."""
    import tempfile

    from onnxslim_bn.app.bench import benchmark

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        onnx.save(pruned, str(out))
        rows = benchmark(path, out, batches=(1, 32), runs=40, min_seconds=0.3).rows
    cell = {r: " / ".join(f"{row.speedup:.2f}x" for row in rows if row.runtime == r) for r in ("onnxruntime", "openvino")}
    return f"{cell['onnxruntime']} | {cell['openvino']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="fixtures")
    parser.add_argument("--names", nargs="*")
    parser.add_argument("--forms", nargs="*", default=["", ".ts-folded"])
    parser.add_argument("--speed", action="store_true", help="also time each pruned model beside its original "
                        "(onnx-bnslim bench: onnxruntime and OpenVINO, batch 1 and 32)")
    parser.add_argument("--probe", action="store_true", help="prune with the CLI's timing probe (the API's default is off)")
    args = parser.parse_args()
    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    held = np.load(folder / "heldout.npz")
    x, y = held["input"].astype(np.float32), held["label"]
    head = "| model | export | selection | accuracy before -> after | agreement | MACs kept | live removed |"
    print(head + (" ORT b1 / b32 | OpenVINO b1 / b32 |" if args.speed else ""))
    print("|---" * (head.count("|") - 1 + (2 if args.speed else 0)) + "|")
    for name in args.names or [k for k, v in manifest.items() if isinstance(v, dict) and "dead_channels" in v]:
        for form in args.forms:
            path = str(folder / f"{name}{form}.onnx")
            base = predict(path, x)
            # the dead fraction as the tool ranks channels: below 1e-3 of the channels it may remove
            # (the manifest's counts BN channels, reader BNs included)
            exact = prune(path, threshold=1e-3, round_to=1, min_channels=1, verify=False).report
            dead = exact.chosen_channels / exact.selection["ranked"]
            settings = [("threshold 1e-3", {"threshold": 1e-3})]
            settings += [(f"ratio {f * dead:.2f} ({f:g} dead)", {"ratio": f * dead}) for f in (0.5, 0.9, 1.0)]
            for label, sel in settings:
                try:
                    r = prune(path, verify=False, probe=args.probe, **sel)
                except BnSlimError as err:
                    print(f"| {name} | {form or 'kept'} | {label} | error: {err} |")
                    continue
                got = predict(r.model, x)
                kept = r.report.after.macs / r.report.before.macs
                speed = f" {timed(path, r.model)} |" if args.speed else ""
                print(f"| {name} | {form.lstrip('.') or 'kept'} | {label} | {(base == y).mean():.1%} -> {(got == y).mean():.1%} | "
                      f"{(got == base).mean():.1%} | {kept:.3f} | {r.report.selection['live_removed']} |{speed}", flush=True)


if __name__ == "__main__":
    main()
