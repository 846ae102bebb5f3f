"""Run inside the onnxsim 0.8.1 venv by bench/peer.py: its structured Wanda pruning, then its ridge
refit, through its API. Imports only what that venv has (numpy, onnx, onnxsim).

    python bench/peer_child.py SRC OUT CALIB.npz SAMPLES SPARSITY
"""

import sys

import numpy as np
import onnx
import onnxsim


def main(src: str, out: str, calib: str, samples: int, sparsity: float) -> None:
    x = np.load(calib)["input"][:samples].astype(np.float32)
    batches = [{"input": x[i : i + 32]} for i in range(0, len(x), 32)]
    original = onnx.load(src)
    pruned = onnxsim.apply_structured_wanda_pruning(original, calibration_data=batches, sparsity=sparsity)
    onnx.save(onnxsim.apply_pruning_finetune(original, pruned, calibration_data=batches), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
