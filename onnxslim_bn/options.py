"""The options of a run: everything that decides what is removed and how the result is checked."""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import BnSlimError
from .hardware import resolve_round_to

# A layer loses at most this share of its live channels by default (dead ones are not limited).
# --ratio / --threshold: Network Slimming's global cut, capped loosely. A budget ranks channels by
# importance per MAC, which piles the cut onto the layers whose channels cost most (a VGG's last
# conv before its C*H*W flatten lost 75% of them at --target-macs 0.5): its cap is the share a
# uniform cut would take (1 - sqrt(fraction): MACs fall with the widths of two layers) plus
# BUDGET_CAP_SLACK, at least BUDGET_LAYER_CAP. The tuning set (24 ordinary nets, --target-macs
# 0.7 / 0.5, mean held-out drop): cap 0.75 1.02 / 4.88, 0.5 0.81 / 2.51, 0.4 0.64 / 1.93, 0.3
# 0.50 / 1.49 points; but below 0.5 a layer 32 wide cannot lose a block of 16, and the budget
# falls back to finer blocks (slower kernels). Where the budget is out of reach under the cap,
# RATIO_LAYER_CAP is tried.
RATIO_LAYER_CAP = 0.75
BUDGET_LAYER_CAP = 0.5
BUDGET_CAP_SLACK = 0.05
QUANTIZE_MODES = ("int8",)  # --quantize values (passes.quantize)
QUANTIZE_NEEDS_DATA = ("--quantize int8 calibrates each activation's INT8 range on real inputs (random noise would set "
                       "ranges the deployed model never sees): pass --data (an .npz, .npy or a folder of images)")


@dataclass
class PruneOptions:
    """Everything that decides what is removed and how the result is checked."""

    ratio: float | None = None  # cut the ranking at this fraction of the prunable channels (netslim's percentile)
    threshold: float | None = None  # or: remove every channel whose importance is below this
    target_macs: float | None = None  # or: keep at most this fraction of the MACs
    target_params: float | None = None  # or: keep at most this fraction of the layer parameters
    # or: keep at most this fraction of the original's latency on `runtime` (per-layer latency
    # table measured on this machine, onnxslim_bn.passes.latency), at `latency_batch` and `threads`
    target_latency: float | None = None
    runtime: str = "onnxruntime"
    latency_batch: int = 1
    threads: int | None = None
    probe: bool = False  # after pruning: time original and pruned side by side, warn when not faster
    min_channels: int = 4  # a space never drops below this many channels
    # a layer loses at most this fraction of its live channels (those above the dead cluster);
    # None: RATIO_LAYER_CAP for --ratio / --threshold, BUDGET_LAYER_CAP for a budget (layer_cap())
    max_layer_ratio: float | None = None
    # how channels are ranked: "gamma" (|BN scale|, Network Slimming), "data" (their cost at the
    # consumers, measured on calibration samples), "auto" (data when --data is given and the
    # scales show no dead cluster, i.e. the model was not sparsity-trained; else gamma)
    importance: str = "auto"
    # kept widths are rounded to a multiple of this, up or down (hardware.round_widths): CPU
    # runtimes run widths on their channel block much faster; "auto": the machine's block
    round_to: int | str = "auto"
    keep: list[str] = field(default_factory=list)  # fnmatch patterns of node or weight names never pruned
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    # inputs for calibration and the check (onnxslim_bn.ir.data): a path (.npz, .npy, a folder of images
    # or of .npy samples) or arrays {input name: array}; else seeded N(0,1) inputs
    data: str | os.PathLike | dict | np.ndarray | None = None
    preprocess: str | None = None  # images in a --data folder: "size=224 mean=... std=..." (data.parse_preprocess)
    calibration_samples: int | None = None  # the first N data samples calibrate, the rest check (default: half)
    check_samples: int = 32  # seeded check samples without data (rounded up to whole fixed batches)
    max_error: float | None = None  # fail when max |pruned - original| exceeds this (any output)
    max_rel_error: float | None = None  # fail when max |diff| / max |original| exceeds this (any output)
    min_cosine: float | None = None  # fail when an output's cosine similarity falls below this
    verify: bool = True
    seed: int = 0
    exact_borders: bool = False  # padded convs: add the border correction as a constant map
    # removed channels: "bias" folds their constants into the next layer's bias, "reconstruct" refits
    # the next layers on calibration data (reconstruct.py), "auto": reconstruct when data is given
    compensation: str = "auto"
    allow_growth: bool = False  # accept a model larger than the input (shared weights sliced per reader, new biases)
    quantize: str | None = None  # "int8": quantize the pruned model (quantize.py), calibrated on --data
    # with quantize: at most this many nodes kept in FP32 where their quantization dominates the
    # error (quantize.sensitivity); "auto": up to quantize.MAX_FP32, 0: none
    int8_fp32: int | str = "auto"

    def validate(self) -> None:
        given = [v is not None for v in (self.ratio, self.threshold, self.target_macs, self.target_params,
                                         self.target_latency)]
        if sum(given) != 1:
            raise BnSlimError("give exactly one of --ratio (e.g. --ratio 0.5), --threshold (e.g. --threshold 1e-3), "
                              "--target-macs (e.g. --target-macs 0.5), --target-params or --target-latency")
        if self.runtime not in ("onnxruntime", "openvino"):
            raise BnSlimError(f"--runtime {self.runtime!r}: choose onnxruntime or openvino")
        if self.latency_batch < 1 or (self.threads is not None and self.threads < 1):
            raise BnSlimError("--latency-batch and --threads must be at least 1")
        for flag, value in (("--target-macs", self.target_macs), ("--target-params", self.target_params),
                            ("--target-latency", self.target_latency)):
            if value is not None and not 0.0 < value < 1.0:
                raise BnSlimError(f"{flag} {value} is outside (0, 1); pass the fraction to keep, e.g. {flag} 0.5")
        if self.importance not in ("auto", "gamma", "data"):
            raise BnSlimError(f"--importance {self.importance!r}: choose auto, gamma or data")
        if self.max_layer_ratio is not None and not 0.0 < self.max_layer_ratio <= 1.0:
            raise BnSlimError(f"--max-layer-ratio {self.max_layer_ratio} is outside (0, 1], e.g. --max-layer-ratio 0.75")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise BnSlimError(f"--ratio {self.ratio} is outside (0, 1); pass the fraction of channels to remove, e.g. --ratio 0.5")
        if self.threshold is not None and not self.threshold > 0:  # NaN too
            raise BnSlimError(f"--threshold {self.threshold} must be positive, e.g. --threshold 1e-3")
        if self.min_channels < 1:
            raise BnSlimError(f"--min-channels {self.min_channels} must be at least 1")
        self.block()  # --round-to: auto or a whole number >= 1
        if self.max_error is not None and not self.max_error >= 0:
            raise BnSlimError(f"--max-error {self.max_error} must be 0 or more, e.g. --max-error 1e-3")
        if self.max_rel_error is not None and not self.max_rel_error >= 0:
            raise BnSlimError(f"--max-rel-error {self.max_rel_error} must be 0 or more, e.g. --max-rel-error 0.05")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise BnSlimError(f"--min-cosine {self.min_cosine} is outside [-1, 1], e.g. --min-cosine 0.99")
        if self.check_samples < 1:
            raise BnSlimError(f"--check-samples {self.check_samples} must be at least 1 (default 32)")
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise BnSlimError(f"--calibration-samples {self.calibration_samples} must be at least 1")
        if self.preprocess and self.data is None:
            raise BnSlimError("--preprocess applies to a folder of images: add --data IMAGE_FOLDER")
        if self.compensation not in ("auto", "bias", "reconstruct"):
            raise BnSlimError(f"--compensation {self.compensation!r}: choose auto, bias or reconstruct")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:  # quantize.py: INT8 after pruning
            raise BnSlimError(f"--quantize {self.quantize!r}: choose {', '.join(QUANTIZE_MODES)}")
        if self.int8_fp32 != "auto" and not (str(self.int8_fp32).isdigit()):
            raise BnSlimError(f"--int8-fp32 {self.int8_fp32!r}: pass auto or a count of nodes (0 for none)")

    def refits(self) -> bool:
        """Whether removed channels are compensated by the refit (``compensation``, "auto": with data)."""
        return self.compensation == "reconstruct" or (self.compensation == "auto" and self.data is not None)

    def budgeted(self) -> bool:
        """Whether a budget (--target-macs / --target-params / --target-latency) sets the cut."""
        return self.target_macs is not None or self.target_params is not None or self.target_latency is not None

    def layer_cap(self) -> float:
        """The share of a layer's live channels it may lose (``max_layer_ratio``, resolved)."""
        if self.max_layer_ratio is not None:
            return self.max_layer_ratio
        if not self.budgeted():
            return RATIO_LAYER_CAP
        fraction = next(f for f in (self.target_macs, self.target_params, self.target_latency) if f is not None)
        return min(1.0, max(BUDGET_LAYER_CAP, 1.0 - math.sqrt(fraction) + BUDGET_CAP_SLACK))

    def block(self) -> int:
        """The width multiple kept widths are rounded to (``round_to``, resolved)."""
        return resolve_round_to(self.round_to)[0]

    def protects(self, node_name: str, weights: tuple[str, ...] | list[str] = ()) -> bool:
        """Whether a ``keep`` pattern (fnmatch) matches the layer's node name or one of its weight names."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep for name in (node_name, *weights))
