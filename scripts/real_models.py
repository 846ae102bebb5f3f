"""Real pretrained CNNs shipped as ONNX inside pip packages, pruned with generated calibration data,
with and without reconstruction (issue 10). Downloads packages: not part of `make test`.

    python scripts/real_models.py [--work /tmp/bnslim-real] [--target-macs 0.8]

Models (extracted from the wheels, whose dependencies are not installed):

- ``rapidocr-onnxruntime==1.4.4``: ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (PP-OCR text-angle
  classifier, 0 / 180 degrees, BN kept by paddle2onnx) and ``ch_PP-OCRv4_rec_infer.onnx``
  (PP-OCRv4 CTC recognizer, 6,625 classes per time step);
- ``ddddocr==1.6.1``: ``common.onnx`` (captcha CRNN: convolutions, an LSTM, a CTC head).

Data, rendered with Pillow and the DejaVu fonts (seeded): random Latin text lines, dark on light,
noised; the angle classifier gets half of them turned by 180 degrees (so it has labels), the
recognizers get them at their input heights (48 and 64 pixels), preprocessed as the packages do.
Calibration and held-out samples are drawn with different seeds. Agreement: top-1 for the
classifier; for the recognizers, the share of samples whose decoded string is unchanged (and
the per-time-step argmax agreement).
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

from onnxslim_bn import prune

PACKAGES = {"rapidocr-onnxruntime": "1.4.4", "ddddocr": "1.6.1"}
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVuSans*.ttf")) or \
    sorted(Path("/usr/share/fonts").rglob("*.ttf"))
CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz0123456789"
WORDS = "the of and to in is for on with as by at from that this are be was or an it not".split()


# ----------------------------------------------------------------------------------- rendering
def text_line(rng: np.random.Generator, captcha: bool = False) -> Image.Image:
    """A random text line (or a 4-6 character captcha with noise strokes) as an RGB image."""
    if captcha:
        text = "".join(rng.choice(list(CHARS), rng.integers(4, 7)))
    else:
        parts = [str(rng.choice(WORDS)) if rng.random() < 0.6 else "".join(rng.choice(list(CHARS), rng.integers(2, 7)))
                 for _ in range(rng.integers(1, 4))]
        text = " ".join(parts)
    size = int(rng.integers(26, 40))
    font = ImageFont.truetype(str(FONTS[rng.integers(len(FONTS))]), size) if FONTS else ImageFont.load_default(size)
    box = font.getbbox(text)
    w, h = box[2] - box[0] + 16, box[3] - box[1] + 16
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    draw.text((8 - box[0], 8 - box[1]), text, font=font, fill=fg)
    if captcha:
        for _ in range(rng.integers(2, 6)):
            xy = [tuple(int(v) for v in rng.integers(0, [w, h])) for _ in range(2)]
            draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 160, 3)), width=int(rng.integers(1, 3)))
    image = image.rotate(float(rng.normal(0, 1.5)), expand=False, fillcolor=bg)
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def paddle_input(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PP-OCR preprocessing: resize to ``height`` keeping the ratio (at most ``width``), scale to
    [-1, 1], pad on the right with zeros: [3, height, width]."""
    w = min(width, max(1, math.ceil(height * image.width / image.height)))
    x = np.asarray(image.resize((w, height), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = (x - 0.5) / 0.5
    return out


def ddddocr_input(image: Image.Image, width: int = 160) -> np.ndarray:
    """ddddocr preprocessing: height 64, grayscale, [0, 1]; here resized to a fixed width."""
    return (np.asarray(image.resize((width, 64), Image.BILINEAR).convert("L"), np.float32) / 255.0)[None]


@dataclass
class Task:
    name: str
    package: str
    member: str  # path of the ONNX file inside the wheel
    make: Callable[[np.random.Generator], tuple[np.ndarray, int]]  # one sample and its label (-1: none)
    shape: list[int]  # the model input shape used for pruning (batch 1)
    kind: str  # "classifier" | "ctc" ([N, T, classes]) | "ctc_tn" ([T, N, classes])


def angle_sample(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    image, label = text_line(rng), int(rng.random() < 0.5)
    if label:
        image = image.rotate(180)
    return paddle_input(image, 48, 192), label


TASKS = [
    Task("PP-OCR angle classifier (mobile v2.0 cls)", "rapidocr-onnxruntime",
         "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", angle_sample, [1, 3, 48, 192],
         "classifier"),
    Task("PP-OCRv4 recognizer (rec)", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         lambda rng: (paddle_input(text_line(rng), 48, 320), -1), [1, 3, 48, 320], "ctc"),
    Task("ddddocr captcha CRNN (common)", "ddddocr", "ddddocr/common.onnx",
         lambda rng: (ddddocr_input(text_line(rng, captcha=True)), -1), [1, 1, 64, 160], "ctc_tn"),
]


# ------------------------------------------------------------------------------------ running
def fetch(work: Path, package: str) -> Path:
    folder = work / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = list(folder.glob(f"{package.replace('-', '_')}-{PACKAGES[package]}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                        f"{package}=={PACKAGES[package]}"], check=True)
        found = list(folder.glob(f"{package.replace('-', '_')}-{PACKAGES[package]}-*.whl"))
    return found[0]


def outputs(model: onnx.ModelProto | str, x: np.ndarray, name: str, batch: int | None, kind: str) -> np.ndarray:
    """The first output over all samples, batch first."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    step = batch or 32
    parts = [sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate([p.transpose(1, 0, 2) if kind == "ctc_tn" else p for p in parts])


def decode(out: np.ndarray, kind: str) -> list[tuple]:
    """Per sample: the predicted class, or the CTC-decoded sequence."""
    if kind == "classifier":
        return [(int(v),) for v in out.argmax(-1)]
    steps = out.argmax(-1)
    strings = []
    for row in steps.reshape(len(steps), -1):
        keep = [int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        strings.append(tuple(keep))
    return strings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bnslim-real", help="scratch folder for the wheels")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--target-macs", type=float, default=0.8)
    parser.add_argument("--tasks", nargs="*", type=int, help="indices into the task list (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    print("| model | method | MACs kept | agreement | per-step agreement / accuracy | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index, task in enumerate(TASKS):
        if args.tasks and index not in args.tasks:
            continue
        wheel = fetch(work, task.package)
        path = work / Path(task.member).name
        if not path.exists():
            path.write_bytes(zipfile.ZipFile(wheel).read(task.member))
        model = onnx.load(str(path))
        name = model.graph.input[0].name
        fixed = max(model.graph.input[0].type.tensor_type.shape.dim[0].dim_value, 0) or None
        samples = [task.make(np.random.default_rng([7, i])) for i in range(args.calibration)]
        calib = np.stack([s for s, _ in samples])
        held = [task.make(np.random.default_rng([8, i])) for i in range(args.heldout)]
        x, labels = np.stack([s for s, _ in held]), np.array([label for _, label in held])
        ref_out = outputs(str(path), x, name, fixed, task.kind)
        ref = decode(ref_out, task.kind)
        extra = f"accuracy {np.mean([r[0] == y for r, y in zip(ref, labels)]):.1%}" if task.kind == "classifier" else ""
        print(f"| {task.name} | unpruned | 100% | 100% | {extra} | |", flush=True)
        data = {name: np.concatenate([calib, x[:64]])}
        for method in ("bias", "reconstruct"):
            clock = time.perf_counter()
            try:
                result = prune(str(path), target_macs=args.target_macs, data=data, calibration_samples=len(calib),
                               compensation=method, input_shapes={name: task.shape}, verify=False)
            except Exception as exc:  # one table row per failure, with its first line
                print(f"| {task.name} | {method} | - | failed: {str(exc).splitlines()[0][:100]} | | |", flush=True)
                continue
            seconds = time.perf_counter() - clock
            out = outputs(result.model, x, name, fixed, task.kind)
            got = decode(out, task.kind)
            agree = np.mean([a == b for a, b in zip(ref, got)])
            if task.kind == "classifier":
                detail = f"accuracy {np.mean([g[0] == y for g, y in zip(got, labels)]):.1%}"
            else:
                detail = f"per step {np.mean(ref_out.argmax(-1) == out.argmax(-1)):.1%}"
            macs = result.report.after.macs / result.report.before.macs
            print(f"| {task.name} | {method} | {macs:.1%} | {agree:.1%} | {detail} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
