"""The peer beside us: onnxsim 0.8.1's post-training structured pruning against `--target-macs F --data`
on the same ordinary models (fixtures/plain, BN kept and TorchScript-folded), the same calibration
samples and the same held-out set. Numbers, not tests: nothing is asserted.

onnxsim prunes to a per-chain channel fraction (`sparsity`), not to a MAC budget, so it runs at
several sparsities and each row shows the MACs it reached; the tool runs at the budgets. MACs of
both are counted by the same counter (the tool's, at batch 1). Writes its section of BENCHMARKS.md
(between the `peer` markers) and prints it.

    python bench/peer.py --peer-python .venv-onnxsim/bin/python [--budgets 0.7 0.5] [--sparsity 0.2 0.3 0.4 0.5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from sections import write_section  # bench/, beside this script

from onnxslim_bn import prune
from onnxslim_bn.ir.runtime import session
from onnxslim_bn.ir.shapes import infer_shapes
from onnxslim_bn.passes.metrics import measure

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ROOT / "fixtures" / "plain"
MODELS = ("vgg", "resnet", "densenet", "mobilenetv2")
EXPORTS = {"BN kept": "{}.onnx", "folded": "{}.ts-folded.onnx"}
BEGIN, END = "<!-- peer: written by bench/peer.py -->", "<!-- /peer -->"


def macs(model: onnx.ModelProto, shape: list[int]) -> int:
    return measure(gs.import_onnx(model), infer_shapes(model, {"input": shape}, "bench"), 0).macs


def predictions(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(model, "bench", optimized=True)
    return np.concatenate([sess.run(None, {"input": x[i : i + 250]})[0] for i in range(0, len(x), 250)]).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="the interpreter of a venv with onnxsim==0.8.1")
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.7, 0.5])
    parser.add_argument("--sparsity", nargs="*", type=float, default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()

    calib = PLAIN / "calibration.npz"
    held = np.load(ROOT / "fixtures" / "heldout.npz")
    x, y = held["input"].astype(np.float32), held["label"]
    samples = len(np.load(calib)["input"])
    shape = [1, *x.shape[1:]]
    rows = []
    for name in args.models:
        for export, pattern in EXPORTS.items():
            path = PLAIN / pattern.format(name)
            original = onnx.load(str(path))
            ref, base = predictions(original, x), macs(original, shape)
            cells = [name, export, f"{(ref == y).mean():.1%}"]
            for budget in args.budgets:
                start = time.perf_counter()
                result = prune(str(path), target_macs=budget, data=str(calib))
                seconds = time.perf_counter() - start
                pred = predictions(result.model, x)
                cells.append(f"{(pred == y).mean():.1%} / {(pred == ref).mean():.1%} @ "
                             f"{macs(result.model, shape) / base:.2f} ({seconds:.0f} s)")
            for sparsity in args.sparsity:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "peer.onnx"
                    start = time.perf_counter()
                    proc = subprocess.run([str(Path(args.peer_python).absolute()), str(Path(__file__).resolve().parent / "peer_child.py"), str(path), str(out), str(calib),
                                           str(samples), str(sparsity)], capture_output=True, text=True, cwd=tmp)
                    seconds = time.perf_counter() - start
                    if proc.returncode or not out.exists():
                        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:80]
                        cells.append(f"failed: {last}")
                        continue
                    peer = onnx.load(str(out))
                    pred = predictions(peer, x)
                    cells.append(f"{(pred == y).mean():.1%} / {(pred == ref).mean():.1%} @ "
                                 f"{macs(peer, shape) / base:.2f} ({seconds:.0f} s)")
            print("  " + " | ".join(cells), file=sys.stderr, flush=True)
            rows.append(cells)

    head = ["Model", "Export", "Original"] + [f"onnx-bnslim --target-macs {b:g}" for b in args.budgets] + \
        [f"onnxsim sparsity {s:g}" for s in args.sparsity]
    text = [BEGIN, "## The peer: onnxsim 0.8.1's structured pruning beside ours", "",
            f"`python bench/peer.py` on fixtures/plain (ordinary models, trained without the L1 penalty), "
            f"{time.strftime('%Y-%m-%d')}. Both calibrate on the same {samples} samples "
            "(fixtures/plain/calibration.npz); accuracy on fixtures/heldout.npz (1000 labelled samples). "
            "onnx-bnslim: `prune(model, target_macs=F, data=calibration.npz)`, defaults otherwise (data importance "
            "and the refit). onnxsim: `apply_structured_wanda_pruning(sparsity=S)` then `apply_pruning_finetune`. "
            "Cells: held-out accuracy / top-1 agreement with the original @ fraction of MACs kept (seconds).", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    text += [END]
    section = "\n".join(text)
    print(section)
    write_section(section, BEGIN, END)


if __name__ == "__main__":
    main()
