"""Models trained here but not tuned on: a tuning set and a held-out report set, and the harness that measures them.

Two sub-commands:

    # needs torch (a venv of its own; see below), writes models, data and manifest.json
    python scripts/report_set.py build --out /work/reportset/tuning --set tuning
    python scripts/report_set.py build --out /work/reportset/report --set report

    # needs onnxruntime and the onnxslim_bn checkout on PYTHONPATH (the one being measured)
    PYTHONPATH=/path/to/checkout python scripts/report_set.py measure --dir DIR --mode sparse
    PYTHONPATH=/path/to/checkout python scripts/report_set.py measure --dir DIR --mode ordinary \
        [--json results.json] [--jobs 2] [--models NAME ...] [--tool-args --round-to 1 ...]
    python scripts/report_set.py measure --dir DIR --mode ordinary --from-json part1.json part2.json  # tables only
    # the peer, onnxsim 0.8.1 in its own venv (`make .venv-onnxsim/.installed`), run by bench/peer_child.py
    python scripts/report_set.py measure --dir DIR --mode ordinary --peer onnxsim [--peer-sparsity 0.1 0.2 0.3]

``build`` generates its data set in code (no download): classes of coloured textures (gratings,
checkerboards, rings, dot lattices), shifted, jittered and noised. The two sets differ in image
size, number of classes, class definitions, noise, widths and every seed (see ``SETS``): the
report set is there to report on, never to tune on. Per set it trains

- sparse nets: the L1 penalty on every BN gamma (Network Slimming, Adam with the subgradient
  added, as in ``fixtures/train.py``); the channels called dead (|gamma| < 1e-3) are *measured*
  to be: their gammas are zeroed (beta kept) and held-out predictions must agree on >= 99%;
- ordinary nets: no penalty, default BN initialisation, several seeds per architecture;

four architectures of our own (a bottleneck ResNet, an SE MobileNet with hard-swish, a plain VGG
with a C*H*W flatten and BN1d, a concat (Inception-like) net). Every model is exported with the
TorchScript exporter twice: ``<name>.kept.onnx`` (``do_constant_folding=False``, BN kept) and
``<name>.folded.onnx`` (defaults, BN folded into the convs). Beside them: ``calib.npz`` (256
unlabelled training-distribution samples, key ``input``: what ``--data`` reads), ``heldout.npz``
(1,000 labelled samples, keys ``input`` and ``label``) and ``manifest.json``.

``measure`` runs the CLI of whatever checkout is first on PYTHONPATH (``python -m onnxslim_bn
prune ... --report JSON``) in a subprocess per run, then computes held-out accuracy and top-1
agreement with the original in onnxruntime here, and prints markdown tables:

- sparse: ``--ratio`` = half the dead fraction, ``--ratio`` = the dead fraction (defaults) and
  ``--threshold 1e-3``, both exports: accuracy before/after, agreement, MACs kept, exit code;
- ordinary: ``--target-macs 0.9 ... 0.5 --data calib.npz``, both exports: accuracy, agreement,
  MACs kept (and the exit code when it is not 0).

The torch environment (torch==2.13.0 is pinned: an unpinned torch pulls CUDA)::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 onnx onnxscript numpy onnxruntime

Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEAD = 1e-3  # |gamma| below this is called dead, and measured to be
DEADNESS_AGREEMENT = 0.99  # held-out agreement after zeroing the dead gammas that the check requires
CALIBRATION = 256
HELDOUT = 1000
ARCHS = ("resnet", "semobilenet", "vgg", "concat")
EXPORTS = ("kept", "folded")
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class SetSpec:
    """Everything that makes one set: data, widths, seeds. The two sets share none of their seeds."""

    image: int
    classes: int
    noise: float
    class_seed: int  # the class definitions (texture family, frequency, angle, colour)
    train_seed: int
    heldout_seed: int
    calib_seed: int
    train_samples: int
    epochs: int  # ordinary nets
    sparse_epochs: int  # the penalty needs more steps to drive gammas to zero
    lam: float  # L1 weight on gamma for the sparse nets
    sparse_seeds: dict[str, int]
    ordinary_seeds: tuple[int, ...]
    widths: dict[str, tuple[int, ...]] = field(default_factory=dict)


SETS = {
    "tuning": SetSpec(
        image=24, classes=10, noise=1.5, class_seed=2101, train_seed=2111, heldout_seed=2112,
        calib_seed=2113, train_samples=3000, epochs=5, sparse_epochs=12, lam=2e-2,
        sparse_seeds={"resnet": 2201, "semobilenet": 2202, "vgg": 2203, "concat": 2204},
        ordinary_seeds=(2301, 2302, 2303),
        widths={
            "resnet": (16, 32, 48),  # bottleneck mid widths per stage (out = 2x)
            "semobilenet": (16, 24, 40, 96),  # stem, stage 1, stage 2, head
            "vgg": (24, 40, 64, 96),  # three conv stages, the BN1d hidden layer
            "concat": (16, 12, 20),  # stem, branch width stage 1, stage 2
        },
    ),
    # The report set: never tuned on. Other image size, classes, class definitions, noise, widths, seeds.
    "report": SetSpec(
        image=32, classes=12, noise=1.7, class_seed=7101, train_seed=7111, heldout_seed=7112,
        calib_seed=7113, train_samples=3000, epochs=5, sparse_epochs=12, lam=2e-2,
        sparse_seeds={"resnet": 7201, "semobilenet": 7202, "vgg": 7203, "concat": 7204},
        ordinary_seeds=(7301, 7302, 7303),
        widths={
            "resnet": (12, 24, 40),
            "semobilenet": (12, 20, 36, 80),
            "vgg": (20, 32, 56, 80),
            "concat": (16, 10, 16),
        },
    ),
}


# --------------------------------------------------------------------------------------- data
def make_data(spec: SetSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coloured textures: each class is a (family, frequency, angle, colour) the class seed draws."""
    size = spec.image
    rng = np.random.default_rng(spec.class_seed)
    family = rng.permutation(np.arange(spec.classes) % 4)
    freqs = rng.uniform(0.35, 0.9, spec.classes) * 16 / size * 1.4
    angles = rng.uniform(0, math.pi, spec.classes)
    colours = rng.uniform(-1, 1, (spec.classes, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, spec.classes, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x = np.empty((n, 3, size, size), np.float32)
    for i, c in enumerate(y):
        a = angles[c] + rng.normal(0, 0.4)
        f = freqs[c] * rng.uniform(0.85, 1.15)
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        phase = rng.uniform(0, 2 * math.pi)
        if family[c] == 0:  # oriented grating
            wave = np.sin(f * u + phase)
        elif family[c] == 1:  # checkerboard
            wave = np.sign(np.sin(f * u + phase) * np.sin(f * v))
        elif family[c] == 2:  # rings around a random centre
            wave = np.sin(f * np.sqrt(u * u + v * v) + phase)
        else:  # dot lattice
            wave = np.cos(f * u + phase) * np.cos(f * v) > 0.5
            wave = wave.astype(np.float32) * 2 - 0.5
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.15 * size * size))
        img = colours[c][:, None, None] * wave[None] * (0.5 + blob[None])
        x[i] = img * rng.uniform(0.7, 1.3) + rng.normal(0, spec.noise, img.shape)
    return x, y.astype(np.int64)


# ------------------------------------------------------------------------------------- models
def _models():
    """The architectures, built on first use so that ``measure`` never needs torch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def cba(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = 2 * mid
            self.body = nn.Sequential(
                *cba(cin, mid, 1), *cba(mid, mid, 3, stride),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return F.relu(self.body(x) + (x if self.short is None else self.short(x)))

    class ResNet(nn.Module):
        """Bottleneck blocks (1x1, 3x3, 1x1 with expansion 2), projection and identity shortcuts."""

        def __init__(self, widths, classes):
            super().__init__()
            w1, w2, w3 = widths
            self.stem = nn.Sequential(*cba(3, 2 * w1))
            self.layers = nn.Sequential(
                Bottleneck(2 * w1, w1, 2), Bottleneck(2 * w1, w1, 1),
                Bottleneck(2 * w1, w2, 2), Bottleneck(2 * w2, w2, 1),
                Bottleneck(2 * w2, w3, 2),
            )
            self.fc = nn.Linear(2 * w3, classes)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            r = max(8, c // 4)
            self.reduce = nn.Conv2d(c, r, 1)
            self.expand = nn.Conv2d(r, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))

    class MBBlock(nn.Module):
        """MobileNetV3 block: expand 1x1, depthwise kxk, squeeze-excitation, project 1x1; hard-swish."""

        def __init__(self, cin, cout, k, stride, expand, se=True):
            super().__init__()
            mid = cin * expand
            layers = [*cba(cin, mid, 1, act=nn.Hardswish), *cba(mid, mid, k, stride, groups=mid, act=nn.Hardswish)]
            if se:
                layers.append(SqueezeExcite(mid))
            layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class SEMobileNet(nn.Module):
        def __init__(self, widths, classes):
            super().__init__()
            stem, c1, c2, head = widths
            self.features = nn.Sequential(
                *cba(3, stem, act=nn.Hardswish),
                MBBlock(stem, c1, 3, 2, 3, se=False), MBBlock(c1, c1, 3, 1, 3),
                MBBlock(c1, c2, 5, 2, 3), MBBlock(c2, c2, 5, 1, 3),
                *cba(c2, head, 1, act=nn.Hardswish),
            )
            self.fc = nn.Linear(head, classes)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    class VGG(nn.Module):
        """Plain conv stages and max pools, a C*H*W flatten into Linear, BN1d in the classifier."""

        def __init__(self, widths, classes, image):
            super().__init__()
            a, b, c, hidden = widths
            self.features = nn.Sequential(
                *cba(3, a), nn.MaxPool2d(2),
                *cba(a, b), *cba(b, b), nn.MaxPool2d(2),
                *cba(b, c), *cba(c, c), nn.MaxPool2d(2),
            )
            side = image // 8
            self.fc1 = nn.Linear(c * side * side, hidden)
            self.bn1 = nn.BatchNorm1d(hidden)
            self.fc2 = nn.Linear(hidden, classes)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(F.relu(self.bn1(self.fc1(x))))

    class Inception(nn.Module):
        """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max pool -> 1x1."""

        def __init__(self, cin, w):
            super().__init__()
            self.b1 = nn.Sequential(*cba(cin, w, 1))
            self.b2 = nn.Sequential(*cba(cin, w, 1), *cba(w, w))
            self.b3 = nn.Sequential(*cba(cin, w // 2, 1), *cba(w // 2, w), *cba(w, w))
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *cba(cin, w, 1))
            self.out = 4 * w

        def forward(self, x):
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    class ConcatNet(nn.Module):
        def __init__(self, widths, classes):
            super().__init__()
            stem, w1, w2 = widths
            i1 = Inception(stem, w1)
            i2 = Inception(i1.out, w1)
            i3 = Inception(2 * w2, w2)
            self.features = nn.Sequential(
                *cba(3, stem), nn.MaxPool2d(2), i1, i2,
                *cba(i2.out, 2 * w2, 1), nn.AvgPool2d(2), i3,
            )
            self.fc = nn.Linear(i3.out, classes)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def build(arch, spec):
        widths = spec.widths[arch]
        if arch == "resnet":
            return ResNet(widths, spec.classes)
        if arch == "semobilenet":
            return SEMobileNet(widths, spec.classes)
        if arch == "vgg":
            return VGG(widths, spec.classes, spec.image)
        return ConcatNet(widths, spec.classes)

    return build


# ----------------------------------------------------------------------------------- training
def _bns(model):
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _predict(model, x) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).argmax(1).numpy()


def _train(model, xtr, ytr, epochs: int, lam: float, seed: int, label: str):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if lam > 0:
        for bn in _bns(model):
            nn.init.constant_(bn.weight, 0.5)  # as the Network Slimming code does
    steps = epochs * math.ceil(len(xtr) / 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            if lam > 0:
                for bn in _bns(model):  # L1 subgradient on gamma (Network Slimming)
                    bn.weight.grad.add_(lam * torch.sign(bn.weight.data))
            opt.step()
            sched.step()
        print(f"  {label} epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    return model.eval()


def _deadness(model, x) -> dict:
    """Zero every gamma below DEAD (beta kept) and measure what the held-out predictions lose."""
    before = _predict(model, x)
    saved = [bn.weight.data.clone() for bn in _bns(model)]
    total = dead = 0
    for bn in _bns(model):
        mask = bn.weight.data.abs() < DEAD
        total += mask.numel()
        dead += int(mask.sum())
        bn.weight.data[mask] = 0.0
    after = _predict(model, x)
    for bn, w in zip(_bns(model), saved):
        bn.weight.data.copy_(w)
    agreement = float((before == after).mean())
    return {
        "bn_channels": total, "dead_channels": dead, "dead_fraction": dead / total,
        "agreement_after_zeroing": agreement, "deadness_check": agreement >= DEADNESS_AGREEMENT,
    }


def _export(model, image: int, out: Path, name: str) -> dict[str, str]:
    import torch

    x = torch.zeros(1, 3, image, image)
    common = dict(input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    files = {"kept": f"{name}.kept.onnx", "folded": f"{name}.folded.onnx"}
    torch.onnx.export(model, x, out / files["kept"], do_constant_folding=False, **common)
    torch.onnx.export(model, x, out / files["folded"], **common)
    return files


def build(out: Path, set_name: str, archs: list[str], only: str) -> None:
    import torch

    torch.set_num_threads(1)  # the machine is shared
    spec = SETS[set_name]
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr = make_data(spec, spec.train_samples, spec.train_seed)
    xte, yte = make_data(spec, HELDOUT, spec.heldout_seed)
    xcal, _ = make_data(spec, CALIBRATION, spec.calib_seed)
    np.savez_compressed(out / "heldout.npz", input=xte, label=yte)
    np.savez_compressed(out / "calib.npz", input=xcal)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    manifest["set"] = set_name
    manifest["spec"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    manifest["data"] = {"heldout": "heldout.npz", "calibration": "calib.npz", "input": "input",
                        "input_shape": [1, 3, spec.image, spec.image], "dead_threshold": DEAD}
    xtr_t, ytr_t, xte_t = torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte)
    make = _models()
    jobs = []
    if only in ("all", "sparse"):
        jobs += [(f"{a}_sparse", a, spec.sparse_seeds[a], spec.lam) for a in archs]
    if only in ("all", "ordinary"):
        jobs += [(f"{a}_s{seed}", a, seed, 0.0) for a in archs for seed in spec.ordinary_seeds]
    for name, arch, seed, lam in jobs:
        start = time.process_time()
        torch.manual_seed(seed)
        epochs = spec.sparse_epochs if lam > 0 else spec.epochs
        model = _train(make(arch, spec), xtr_t, ytr_t, epochs, lam, seed, name)
        acc = float((_predict(model, xte_t) == yte).mean())
        info = {
            "arch": arch, "kind": "sparse" if lam > 0 else "ordinary", "seed": seed, "lambda": lam,
            "widths": list(spec.widths[arch]), "epochs": epochs, "accuracy": acc,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if lam > 0:
            info.update(_deadness(model, xte_t))
        info["files"] = _export(model, spec.image, out, name)
        info["onnx_accuracy"] = {e: _onnx_accuracy(out / f, xte, yte) for e, f in info["files"].items()}
        info["train_cpu_seconds"] = round(time.process_time() - start, 1)
        print(f"{name}: {json.dumps(info)}", flush=True)
        manifest["models"][name] = info
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float | None:
    try:
        import onnxruntime  # noqa: F401  (optional in the torch venv)
    except ImportError:
        return None
    return float((logits(path, x).argmax(1) == y).mean())


# ------------------------------------------------------------------------------------ measure
def logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 250]})[0] for i in range(0, len(x), 250)])


@dataclass
class Run:
    model: str
    export: str
    setting: str  # e.g. "ratio 0.31", "threshold 1e-3", "macs 0.7"
    args: list[str]
    exit_code: int | None = None
    error: str = ""
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    agreement: float | None = None
    macs_kept: float | None = None
    live_removed: int | None = None
    removed: int | None = None
    check_agreement: float | None = None
    check_cosine: float | None = None
    probe_speedup: float | None = None
    speed: dict[str, float] = field(default_factory=dict)  # --speed: "onnxruntime b1" -> pruned over original
    # --speed: "onnxruntime b1" -> "faster" / "same" / "slower", the speed-up against bench's A/A band
    speed_verdict: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    ranked_dead: str = ""  # sparse: "dead/ranked" channels as the checkout's inspect scores them


def _speed(src: Path, out: Path, python: str) -> tuple[dict[str, float], dict[str, str]]:
    """Speed-ups of ``out`` over ``src`` (``onnx-bnslim bench``: alternating, 4 rounds), onnxruntime and
    OpenVINO at batch 1 and 32, run by the checkout being measured; and each row's verdict against
    the A/A band (the original timed against a copy of itself as often). A checkout whose bench
    has no band gives 'slower' for any speed-up below 1 (how it was judged before)."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "bench.json"
        subprocess.run([python, "-m", "onnxslim_bn", "bench", str(src), str(out), "--batch", "1,32", "--runs", "40",
                        "--json", str(table)], capture_output=True, text=True, cwd=tmp, check=True)
        rows = json.loads(table.read_text())["rows"]
    keys = [f"{r['runtime']} b{r['batch']}" for r in rows]
    verdicts = [r.get("verdict") or ("slower" if r["speedup"] < 1.0 else "faster") for r in rows]
    return {k: round(r["speedup"], 3) for k, r in zip(keys, rows)}, dict(zip(keys, verdicts))


def _run_one(run: Run, src: Path, python: str, x: np.ndarray, y: np.ndarray, reference: np.ndarray,
             speed: bool = False) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "slim.onnx", Path(tmp) / "report.json"
        cmd = [python, "-m", "onnxslim_bn", "prune", str(src), *run.args, "-o", str(out), "--report", str(report), "-q"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)  # cwd: PYTHONPATH decides the checkout
        run.seconds = round(time.perf_counter() - start, 1)
        run.exit_code = proc.returncode
        run.error = (proc.stderr.strip().splitlines() or [""])[-1][:300] if proc.returncode else ""
        run.accuracy_before = float((reference == y).mean())
        if report.exists():
            rep = json.loads(report.read_text())
            before, after = rep.get("before") or {}, rep.get("after") or {}
            if before.get("macs") and after.get("macs") is not None:
                run.macs_kept = after["macs"] / before["macs"]
            sel = rep.get("selection") or {}
            run.live_removed = sel.get("live_removed")
            run.removed = rep.get("removed_channels")
            ver = rep.get("verification") or {}
            run.check_agreement = ver.get("top1_agreement")
            cos = ver.get("cosine")
            run.check_cosine = min(cos.values()) if isinstance(cos, dict) and cos else cos
            run.probe_speedup = (rep.get("probe") or {}).get("speedup")
        if proc.returncode == 0 and out.exists():
            pred = logits(out, x).argmax(1)
            run.accuracy_after = float((pred == y).mean())
            run.agreement = float((pred == reference).mean())
            if speed:
                run.speed, run.speed_verdict = _speed(src, out, python)
    return run


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def ranked_dead(python: str, src: Path) -> tuple[int, int]:
    """(dead, ranked): the channels the checkout ranks (unblocked spaces) and those scored below DEAD.

    The BN dead fraction of the manifest counts every BN; a residual group is removable only where
    all its BNs are dead, so the fraction that ``--ratio`` can reach without a live channel is this one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inspect.json"
        subprocess.run([python, "-m", "onnxslim_bn", "inspect", str(src), "--json", str(out), "-q"],
                       capture_output=True, text=True, cwd=tmp, check=True)
        spaces = json.loads(out.read_text())["spaces"]
    scores = [x for sp in spaces if sp.get("blocked") is None for x in (sp.get("scores") or [])]
    return sum(x < DEAD for x in scores), len(scores)


def _sparse_runs(manifest: dict, folder: Path, python: str, extra: list[str]) -> list[Run]:
    runs = []
    for name, info in manifest["models"].items():
        if info["kind"] != "sparse":
            continue
        for export in EXPORTS:
            dead, ranked = ranked_dead(python, folder / info["files"][export])
            frac = dead / ranked
            settings = [(f"ratio {frac / 2:.3f} (dead/2)", ["--ratio", f"{frac / 2:.4f}"]),
                        (f"ratio {frac:.3f} (dead)", ["--ratio", f"{frac:.4f}"]),
                        ("threshold 1e-3", ["--threshold", "1e-3"])]
            runs += [Run(name, export, s, a + extra, ranked_dead=f"{dead}/{ranked}") for s, a in settings]
    return runs


def _ordinary_runs(manifest: dict, calib: Path, extra: list[str], budgets: list[float]) -> list[Run]:
    runs = []
    for name, info in manifest["models"].items():
        if info["kind"] != "ordinary":
            continue
        for export in EXPORTS:
            runs += [Run(name, export, f"macs {b:g}", ["--target-macs", f"{b:g}", "--data", str(calib)] + extra)
                     for b in budgets]
    return runs


def _verdicts(run: Run) -> dict[str, str]:
    """The bench verdicts of a timed run; a run stored before bench had a band: below 1.00x is slower."""
    return run.speed_verdict or {k: "slower" if v < 1.0 else "faster" for k, v in run.speed.items()}


def _speed_cell(run: Run, key: str) -> str:
    """A speed-up, starred when bench called it slower beyond its A/A band."""
    return f"{run.speed[key]:.2f}x" + ("*" if _verdicts(run).get(key) == "slower" else "")


def _print_sparse(runs: list[Run], manifest: dict) -> None:
    rows, timed = [], any(r.speed for r in runs)
    for r in runs:
        info = manifest["models"][r.model]
        rows.append([
            r.model, r.export, f"{100 * info['dead_fraction']:.1f}%", _pct(info.get("agreement_after_zeroing")),
            r.ranked_dead, r.setting, str(r.exit_code),
            _pct(r.accuracy_before), _pct(r.accuracy_after), _pct(r.agreement),
            "—" if r.macs_kept is None else f"{r.macs_kept:.3f}",
            "—" if r.live_removed is None else str(r.live_removed),
        ] + ([" / ".join(_speed_cell(r, f"{rt} b{b}") for b in (1, 32)) if r.speed else "—"
              for rt in ("onnxruntime", "openvino")] if timed else []))
    # "zeroed": held-out agreement of the trained net with every |gamma| < 1e-3 set to 0 (beta kept), measured
    # at build: what removing all of them can keep at best (the channels called dead are not all dead)
    print(_table(["model", "export", "BN dead", "zeroed agreement %", "ranked dead", "setting", "exit", "acc before", "acc after", "agreement %",
                  "MACs kept", "live removed"] + (["onnxruntime b1 / b32", "OpenVINO b1 / b32"] if timed else []), rows))
    if timed:
        count = sum(1 for r in runs if r.speed)
        below = [r for r in runs if r.speed and min(r.speed.values()) < 1.0]
        slow = [r for r in runs if "slower" in _verdicts(r).values()]
        print(f"\n{len(slow)} of {count} timed runs are slower than the original somewhere (runtime, batch) beyond "
              f"the A/A band (marked *); {len(below)} have a speed-up below 1.00x somewhere, the rest of them within "
              "the noise of timing the original against itself.")
    faithful = [r for r in runs if r.agreement is not None and r.agreement >= 0.995]
    print(f"\n{len(faithful)} of {len(runs)} runs keep held-out agreement >= 99.5% (exit 0 and written).")
    failed = [r for r in runs if r.exit_code]
    for r in failed:
        print(f"- {r.model} {r.export} {r.setting}: exit {r.exit_code}: {r.error}")


def _print_ordinary(runs: list[Run], budgets: list[float]) -> None:
    keyed = {(r.model, r.export, r.setting): r for r in runs}
    models = sorted({(r.model, r.export) for r in runs})
    for title, cell in (
        ("accuracy after (held-out %; original in the first column)", lambda r: _pct(r.accuracy_after)),
        ("top-1 agreement with the original (held-out %)", lambda r: _pct(r.agreement)),
        ("MACs kept (fraction; exit code when not 0)",
         lambda r: ("—" if r.macs_kept is None else f"{r.macs_kept:.3f}") + (f" (exit {r.exit_code})" if r.exit_code else "")),
    ):
        rows = []
        for model, export in models:
            first = keyed[(model, export, f"macs {budgets[0]:g}")]
            rows.append([model, export, _pct(first.accuracy_before)]
                        + [cell(keyed[(model, export, f"macs {b:g}")]) for b in budgets])
        print(f"\n**{title}**\n")
        print(_table(["model", "export", "orig acc"] + [f"{b:g}" for b in budgets], rows))
    rows = []
    for b in budgets:
        got = [r for r in runs if r.setting == f"macs {b:g}"]
        ok = [r for r in got if r.accuracy_after is not None]
        drops = [100 * (r.accuracy_before - r.accuracy_after) for r in ok]
        agree = [100 * r.agreement for r in ok]
        rows.append([
            f"{b:g}", f"{len(ok)}/{len(got)}",
            "—" if not drops else f"{np.mean(drops):.2f}", "—" if not drops else f"{max(drops):.1f}",
            "—" if not agree else f"{np.mean(agree):.1f}", "—" if not agree else f"{min(agree):.1f}",
            str(sum(d <= 1.0 for d in drops)), str(sum(d <= 2.0 for d in drops)), str(sum(a >= 97.0 for a in agree)),
        ])
    print("\n**summary per budget** (drop = original accuracy - pruned accuracy, points)\n")
    print(_table(["budget", "written", "mean drop", "worst drop", "mean agreement", "worst agreement",
                  "drop <= 1", "drop <= 2", "agreement >= 97"], rows))
    for r in runs:
        if r.exit_code:
            print(f"- {r.model} {r.export} {r.setting}: exit {r.exit_code}: {r.error}")


def _origin(python: str) -> str:
    """The checkout the subprocesses import (from a neutral cwd, as they run), with its commit."""
    with tempfile.TemporaryDirectory() as tmp:
        found = subprocess.run([python, "-c", "import onnxslim_bn, pathlib; print(pathlib.Path(onnxslim_bn.__file__).parent.parent)"],
                               capture_output=True, text=True, cwd=tmp)
    if found.returncode:
        return "(onnxslim_bn not importable)"
    root = found.stdout.strip()
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "onnxslim_bn"], capture_output=True, text=True)
    if head.returncode:
        return root
    return f"{root} at {head.stdout.strip()}" + (" with uncommitted changes in onnxslim_bn/" if dirty.stdout.strip() else "")


def measure(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    held = np.load(folder / "heldout.npz")
    x, y = held["input"].astype(np.float32), held["label"]
    extra = list(args.tool_args or [])
    budgets = [float(b) for b in args.budgets]
    if args.from_json and args.peer:
        _print_peer([r for f in args.from_json for r in json.loads(Path(f).read_text())])
        return
    if args.from_json:  # print the tables of runs saved by --json (several files: parts of one measurement)
        runs = [Run(**r) for f in args.from_json for r in json.loads(Path(f).read_text())]
        print(f"# {manifest['set']} set, {args.mode}: {len(runs)} runs read from {', '.join(args.from_json)}\n")
        if args.mode == "sparse":
            _print_sparse(runs, manifest)
        else:
            _print_ordinary(runs, budgets)
        return
    if args.peer:
        results = measure_peer(args, folder, manifest, x, y)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.mode == "sparse":
        runs = _sparse_runs(manifest, folder, args.python, extra)
    else:
        runs = _ordinary_runs(manifest, folder / "calib.npz", extra, budgets)
    if args.models:
        runs = [r for r in runs if r.model in args.models]
    references = {}
    for r in runs:
        key = (r.model, r.export)
        if key not in references:
            references[key] = logits(folder / manifest["models"][r.model]["files"][r.export], x).argmax(1)
    print(f"# {manifest['set']} set, {args.mode}: {len(runs)} runs of `python -m onnxslim_bn prune` from {_origin(args.python)}"
          + (f", extra args `{shlex.join(extra)}`" if extra else ""), flush=True)

    def one(r: Run) -> Run:
        src = folder / manifest["models"][r.model]["files"][r.export]
        done = _run_one(r, src, args.python, x, y, references[(r.model, r.export)], speed=args.speed)
        print(f"  {r.model} {r.export} {r.setting}: exit {done.exit_code}, acc {_pct(done.accuracy_after)}, "
              f"agreement {_pct(done.agreement)}, MACs {done.macs_kept}, {done.seconds} s", file=sys.stderr, flush=True)
        return done

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(one, runs))
    print()
    if args.mode == "sparse":
        _print_sparse(runs, manifest)
    else:
        _print_ordinary(runs, budgets)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")



# --------------------------------------------------------------------------------- the peer
def count_macs(path: Path, image: int) -> int:
    """Multiply-accumulates of the Conv, Gemm and MatMul nodes at batch 1, from ONNX shape inference."""
    import onnx

    model = onnx.load(str(path))
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                k = a[0] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
                total += int(np.prod(out)) * k
    return total


def measure_peer(args: argparse.Namespace, folder: Path, manifest: dict, x: np.ndarray, y: np.ndarray) -> list[dict]:
    image = manifest["spec"]["image"]
    sparsities = [float(v) for v in args.peer_sparsity]
    names = [n for n, i in manifest["models"].items() if i["kind"] == "ordinary" and (not args.models or n in args.models)]
    print(f"# {manifest['set']} set, peer onnxsim 0.8.1 (apply_structured_wanda_pruning sparsity S, then "
          f"apply_pruning_finetune), calibration: the first {args.peer_samples} samples of calib.npz (those the tool calibrates on)\n")
    results = []
    for name in names:
        for export in EXPORTS:
            src = folder / manifest["models"][name]["files"][export]
            ref = logits(src, x).argmax(1)
            base = count_macs(src, image)
            for sp in sparsities:
                res = {"model": name, "export": export, "sparsity": sp, "accuracy_before": float((ref == y).mean())}
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "peer.onnx"
                    start = time.perf_counter()
                    proc = subprocess.run([str(Path(args.peer_python).absolute()), str(Path(__file__).resolve().parent.parent / "bench" / "peer_child.py"), str(src), str(out),
                                           str(folder / "calib.npz"), str(args.peer_samples), str(sp)],
                                          capture_output=True, text=True, cwd=tmp)
                    res["seconds"] = round(time.perf_counter() - start, 1)
                    res["exit_code"] = proc.returncode
                    if proc.returncode == 0 and out.exists():
                        pred = logits(out, x).argmax(1)
                        res.update(accuracy_after=float((pred == y).mean()), agreement=float((pred == ref).mean()),
                                   macs_kept=count_macs(out, image) / base)
                    else:
                        res["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
                print(f"  {name} {export} sparsity {sp}: {res}", file=sys.stderr, flush=True)
                results.append(res)
    _print_peer(results)
    return results


def _print_peer(results: list[dict]) -> None:
    names = list(dict.fromkeys(r["model"] for r in results))
    sparsities = list(dict.fromkeys(r["sparsity"] for r in results))
    rows = []
    for name in names:
        for export in EXPORTS:
            got = [r for r in results if r["model"] == name and r["export"] == export]
            rows.append([name, export, _pct(got[0]["accuracy_before"])] + [
                (f"{_pct(r.get('accuracy_after'))} / {_pct(r.get('agreement'))} @ {r['macs_kept']:.2f}"
                 if "macs_kept" in r else f"exit {r['exit_code']}") for r in got])
    print("cells: held-out accuracy / agreement with the original (%) @ MACs kept (fraction, counted here)\n")
    print(_table(["model", "export", "orig acc"] + [f"S={sp:g}" for sp in sparsities], rows))


# ---------------------------------------------------------------------------------------- cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train and export a set (needs torch)")
    b.add_argument("--out", required=True)
    b.add_argument("--set", choices=list(SETS), required=True)
    b.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    b.add_argument("--only", choices=["all", "sparse", "ordinary"], default="all")
    m = sub.add_parser("measure", help="run the CLI of the checkout on PYTHONPATH over a built set")
    m.add_argument("--dir", required=True)
    m.add_argument("--mode", choices=["sparse", "ordinary"], required=True)
    m.add_argument("--models", nargs="*", help="only these models (names in manifest.json)")
    m.add_argument("--budgets", nargs="*", default=list(BUDGETS))
    m.add_argument("--python", default=sys.executable, help="the interpreter that runs `-m onnxslim_bn`")
    m.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: the machine is shared)")
    m.add_argument("--json", help="also write every run's numbers here")
    m.add_argument("--speed", action="store_true", help="sparse: also time each written model beside its original "
                   "(onnx-bnslim bench: onnxruntime and OpenVINO, batch 1 and 32)")
    m.add_argument("--from-json", nargs="*", help="run nothing: print the tables of runs saved with --json")
    m.add_argument("--tool-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to every prune run, e.g. --tool-args --round-to 1")
    m.add_argument("--peer", choices=["onnxsim"], help="instead of the tool: onnxsim 0.8.1's post-training "
                   "structured pruning (ordinary models only), run in its own venv (--peer-python)")
    m.add_argument("--peer-python", default=".venv-onnxsim/bin/python")
    m.add_argument("--peer-sparsity", nargs="*", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="onnxsim's per-chain fraction of channels removed (the MACs it reaches are measured)")
    m.add_argument("--peer-samples", type=int, default=128)
    args = parser.parse_args()
    if args.command == "build":
        build(Path(args.out), args.set, args.archs, args.only)
    else:
        measure(args)


if __name__ == "__main__":
    main()
