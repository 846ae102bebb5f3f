"""Back to training: rebuild a pruned model in PyTorch from ``widths.json`` and the pruned ONNX weights.

    onnx-bnslim fixtures/resnet.onnx --ratio 0.3 -o resnet.slim.onnx --export-widths widths.json
    python examples/finetune_from_widths.py resnet.slim.onnx widths.json --data fixtures/heldout.npz --epochs 1

The model is the fixtures' ResNet (fixtures/train.py), written here with one width per layer
so that it can take the pruned widths. For your own model, do the same three steps:

1. give every layer its kept width: ``widths.json`` lists, per layer, the weight name your
   training code uses (``layers.0.conv1.weight``), the original and kept width and the kept
   channel indices (to slice a checkpoint of the unpruned model instead, if you prefer);
2. load the pruned weights from the ONNX file: every Conv / Gemm / BatchNormalization node reads
   its parameters as initializers; the node is found by its weight's name. A Conv that had no
   bias may have one now: the removed channels' constant output (BN's beta after ReLU) is folded
   into the next layer's bias, and that bias must stay for the model to compute the same thing;
3. check that the rebuilt model computes what the pruned ONNX model computes (here: within
   1e-5 on the inputs given), then fine-tune as usual.

Needs torch, onnx, numpy (and onnxruntime for the check). Not imported by the onnx-bnslim package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

# --------------------------------------------------------------------------- widths
STEM = "stem.0"
BLOCKS = [(24, 1), (24, 1), (48, 2), (48, 1), (64, 2)]  # the fixture's (width, stride) per block


def read_widths(path: str | Path) -> dict[str, int]:
    """Module name -> kept output width, from ``--export-widths`` (``layers.0.conv1.weight`` -> ``layers.0.conv1``)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("kind") != "widths":
        raise SystemExit(f"{path}: not an onnx-bnslim widths file (kind {doc.get('kind')!r})")
    return {layer["weight"].removesuffix(".weight"): layer["kept"] for layer in doc["layers"]}


# --------------------------------------------------------------------------- the model, one width per layer
class BasicBlock(nn.Module):
    def __init__(self, name: str, cin: int, width: dict[str, int], stride: int, shortcut: bool, bias: set[str]) -> None:
        super().__init__()
        mid, out = width[f"{name}.conv1"], width[f"{name}.conv2"]
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=f"{name}.conv1" in bias)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out, 3, 1, 1, bias=f"{name}.conv2" in bias)
        self.bn2 = nn.BatchNorm2d(out)
        self.short = None
        if shortcut:
            self.short = nn.Sequential(nn.Conv2d(cin, width[f"{name}.short.0"], 1, stride, bias=f"{name}.short.0" in bias),
                                       nn.BatchNorm2d(width[f"{name}.short.0"]))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """fixtures/train.py's ResNet with the widths of ``width`` (module name -> output channels)."""

    def __init__(self, width: dict[str, int], bias: set[str] = frozenset(), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width[STEM], 3, 1, 1, bias=STEM in bias), nn.BatchNorm2d(width[STEM]), nn.ReLU())
        blocks, cin, original_cin = [], width[STEM], 24
        for i, (original, stride) in enumerate(BLOCKS):
            name = f"layers.{i}"
            blocks.append(BasicBlock(name, cin, width, stride, stride != 1 or original_cin != original, bias))
            cin, original_cin = width[f"{name}.conv2"], original
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(x.view(x.size(0), -1))


# --------------------------------------------------------------------------- weights from the pruned ONNX
def onnx_layers(model: onnx.ModelProto) -> dict[str, list[np.ndarray | None]]:
    """Weight name -> the values of the node's inputs 1.. (weight, bias / BN scale, bias, mean, var)."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "BatchNormalization") and len(node.input) > 1 and node.input[1] in init:
            out[node.input[1]] = [init.get(name) for name in node.input[1:]]
    return out


def load_pruned(model: nn.Module, layers: dict[str, list[np.ndarray | None]]) -> None:
    """Copy every Conv / Linear / BatchNorm parameter from the ONNX node that reads ``<module>.weight``."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        values = layers.get(f"{name}.weight")
        if values is None:
            raise SystemExit(f"the pruned model has no layer with the weight '{name}.weight'")
        targets = ([module.weight, module.bias, module.running_mean, module.running_var]
                   if isinstance(module, nn.BatchNorm2d) else [module.weight, module.bias])
        for target, value in zip(targets, values):
            if target is None or value is None:
                continue
            if tuple(target.shape) != value.shape:
                raise SystemExit(f"{name}: widths.json gives {tuple(target.shape)}, the ONNX weight is {value.shape}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


def rebuild(onnx_path: str | Path, widths_path: str | Path) -> ResNet:
    proto = onnx.load(str(onnx_path))
    layers = onnx_layers(proto)
    width = read_widths(widths_path)
    bias = {w.removesuffix(".weight") for w, v in layers.items() if len(v) > 1 and v[1] is not None
            and w.removesuffix(".weight") in width and not w.startswith("fc.")}
    model = ResNet(width, bias)
    load_pruned(model, layers)
    return model.eval()


def max_diff(model: nn.Module, onnx_path: str | Path, x: np.ndarray) -> float:
    """max |torch - onnxruntime| on ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    return float(np.max(np.abs(got - want)))


def finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 1e-3) -> None:
    """A plain fine-tune (keep the L1 term on gamma if you mean to prune again)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        for i in range(0, len(xt), 64):
            loss = F.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="the pruned model (onnx-bnslim ... -o)")
    parser.add_argument("widths", help="the widths file (onnx-bnslim ... --export-widths)")
    parser.add_argument("--data", help=".npz with 'input' (and 'label' for --epochs), e.g. fixtures/heldout.npz")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tune this many epochs on --data (default 0)")
    parser.add_argument("--save", help="write the rebuilt model's state_dict here")
    args = parser.parse_args()
    model = rebuild(args.onnx, args.widths)
    print(f"rebuilt: {sum(p.numel() for p in model.parameters()):,} parameters")
    if args.data:
        data = np.load(args.data)
        x = data["input"].astype(np.float32)
        diff = max_diff(model, args.onnx, x[:256])
        print(f"max |torch - onnxruntime| on {min(len(x), 256)} samples: {diff:.3g}")
        if diff > 1e-5:
            raise SystemExit("the rebuilt model does not match the pruned ONNX model within 1e-5")
        if args.epochs:
            finetune(model, x, data["label"].astype(np.int64), args.epochs)
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
