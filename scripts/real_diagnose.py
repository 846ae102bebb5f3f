"""Why a real model's agreement falls short at a budget: method / option variants side by side,
the per-layer fit errors of the reconstruction, and per-space sensitivity (the budget's cut of
one space at a time). Uses the tasks, samples and cache of ``real_models.py``; downloads
packages, not part of ``make test``.

    python scripts/real_diagnose.py --task 0 --variant data+reconstruct --variant "rt1:round_to=1"
    python scripts/real_diagnose.py --task 0 --sensitivity

A variant is ``label[:key=value,key=value]``; a label naming a method of ``real_models.METHODS``
sets importance and compensation; the keys are ``prune`` options (numbers parsed). Besides
agreement and accuracy, each row gives the mean KL divergence of the pruned model's class
probabilities from the original's on the held-out samples (a smoother measure than agreement).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import numpy as np
import real_models

from onnxslim_bn.app import pipeline


def softmax(z: np.ndarray) -> np.ndarray:
    if np.all(z >= 0) and np.allclose(z.sum(-1), 1, atol=1e-3):  # already probabilities
        return np.clip(z, 1e-12, 1)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(ref: np.ndarray, out: np.ndarray) -> float:
    p, q = softmax(ref), softmax(out)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)))


def parse(variant: str) -> tuple[str, dict]:
    label, _, rest = variant.partition(":")
    options: dict = {}
    if label in real_models.METHODS:
        options["importance"], options["compensation"] = real_models.METHODS[label]
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = int(value)
        except ValueError:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value
    return label, options


def evaluate(case: real_models.Case, label: str, **options) -> dict:
    found = case.run(label, **options)
    if "result" in found:
        out = real_models.outputs(found["result"].model, case.x, case.name, case.batch, case.task.kind)
        found["kl"] = kl(case.ref_out, out)
    return found


def line(found: dict) -> str:
    if "error" in found:
        return f"| {found['method']} | failed: {found['error']} | | | | |"
    return (f"| {found['method']} | {found['macs']:.1%} | {found['agreement']:.1%} | {found['detail']} | "
            f"{found['kl']:.4f} | {found['seconds']:.0f} |")


def capture_plans() -> list:
    """Record every plan ``select`` returns (the pipeline's reference to it is patched)."""
    plans: list = []
    original = pipeline.select

    def spy(*args, **kwargs):
        plan = original(*args, **kwargs)
        plans.append(plan)
        return plan

    pipeline.select = spy
    return plans


def only_space(root: int, kept: np.ndarray) -> None:
    """Make ``select`` return its plan with every space kept whole except ``root``."""
    original = pipeline.select

    def one(*args, **kwargs):
        plan = original(*args, **kwargs)
        plan.kept = {root: kept}
        return plan

    pipeline.select = one


def sensitivity(case: real_models.Case, options: dict) -> None:
    """The budget's cut, one space at a time (everything else whole), with the same options."""
    plans = capture_plans()
    base = evaluate(case, "all spaces", **options)
    spy = pipeline.select
    plan = plans[-1]
    print("| space (first layer) | size | kept | MACs kept | agreement | KL |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| all | | | {base['macs']:.1%} | {base['agreement']:.1%} | {base['kl']:.4f} |", flush=True)
    def first_layer(root: int) -> str:
        producers = getattr(plan.analysis.spaces[root], "producers", None) or []
        return getattr(producers[0], "name", str(producers[0])) if producers else "-"
    for root, kept in plan.kept.items():
        size = plan.analysis.spaces[root].size
        if len(kept) == size:
            continue
        pipeline.select = spy
        only_space(root, kept)
        found = evaluate(case, f"space {root}", **options)
        label = first_layer(root)
        print(f"| {root} {label} | {size} | {len(kept)} | {found.get('macs', 0):.1%} | "
              f"{found.get('agreement', 0):.1%} | {found.get('kl', float('nan')):.4f} |", flush=True)
    pipeline.select = spy


def fits(case: real_models.Case, options: dict) -> None:
    """The reconstruction's per-layer relative errors, before and after the refit."""
    found = evaluate(case, "fits", **options)
    print(line(found))
    rec = found["result"].reconstruction
    if rec is None:
        return
    for fit in rec.layers:
        print(f"  {fit.node:>12} {fit.op:6} in {fit.input_channels[0]:4}/{fit.input_channels[1]:4} "
              f"{'down' if fit.downstream else 'cut '} rows {fit.rows:6} error {fit.error_before:.4f} -> {fit.error_after:.4f}")
    for label, reason in rec.skipped:
        print(f"  skipped {label}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bnslim-real")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--target-macs", type=float, default=0.8)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--sensitivity", action="store_true", help="cut one space at a time (first variant's options)")
    parser.add_argument("--fits", action="store_true", help="per-layer reconstruction errors (first variant's options)")
    parser.add_argument("--patch", action="append", default=[],
                        help="MODULE.NAME=VALUE: set a constant of an onnxslim_bn module (a prototype, e.g. "
                             "reconstruct.MIN_ROWS_PER_UNKNOWN=1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for item in args.patch:
        target, _, value = item.partition("=")
        module, _, name = target.rpartition(".")
        setattr(importlib.import_module(f"onnxslim_bn.{module}"), name, float(value) if "." in value else int(value))
    case = real_models.Case.load(Path(args.work), real_models.TASKS[args.task], args.calibration, args.heldout)
    variants = [parse(v) for v in (args.variant or ["data+reconstruct"])]
    for _, options in variants:
        options.setdefault("target_macs", args.target_macs)
    print(f"{case.task.name}: {len(case.calib)} calibration samples, {len(case.x)} held out")
    if args.sensitivity:
        sensitivity(case, variants[0][1])
        return
    if args.fits:
        fits(case, variants[0][1])
        return
    print("| variant | MACs kept | agreement | accuracy / per step | KL | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, options in variants:
        print(line(evaluate(case, label, **options)), flush=True)


if __name__ == "__main__":
    main()
