"""The machine's convolution channel block, and kept widths rounded to it (``--round-to auto``).

CPU runtimes run convolutions in blocked layouts: onnxruntime's NCHWc kernels (MLAS) and
OpenVINO's oneDNN kernels hold 16 channels per block with AVX-512, 8 with AVX2 / AVX. A layer
whose width is not a multiple of the block is either padded up to it or not blocked at all (onnxruntime
then falls back to its slower plain-NCHW path), so a width of 12 can cost more than a width of 16.

The rounding rule (:func:`round_widths`), for a space of ``size`` channels of which the selection
keeps ``keep``:

- a space left whole stays whole, and a width already on the block stays;
- otherwise the candidates are the multiples of the block just below and just above ``keep``,
  where the one above must stay below ``size`` (rounding never undoes the pruning of a space),
  and the one below must keep at least ``min_channels`` and at least one block;
- a candidate more than half a block away is taken only when it brings the running total closer
  to the budget (so 30 of 32 never drops to 16 just because 32 is ruled out);
- of the candidates left, the one that keeps the running total closest to the budget wins (spaces
  weighted by ``weights``, e.g. the cost of one channel, walked from the heaviest step down, so the
  small steps at the end even out the large ones); ties round up (fewer channels lost);
- with no candidate left, the width is left as the selection chose it.

This applies to narrow spaces as well: a space of 24 keeping 11 becomes 16 with a block of 16.

Grouped convs (1 < group < channels) whose groups are on the block keep every group on it
(:func:`group_width`): onnxruntime's NCHWc optimizer takes such a conv only when each group's
input and output widths are multiples of the block, and off it the conv ran unblocked between two
layout reorders, slower than the unpruned conv. With no multiple of the block left below a
group's width, the space stays whole (and the report says so).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from pathlib import Path

from .errors import BnSlimError

log = logging.getLogger(__name__)

# x86 flag in /proc/cpuinfo -> (block, why); the first present wins
_X86_BLOCKS = (
    ("avx512f", 16, "AVX-512F"),
    ("avx2", 8, "AVX2"),
    ("avx", 8, "AVX"),
)
_FALLBACK_BLOCK = 4


def channel_block(cpuinfo: str | None = None, machine: str | None = None) -> tuple[int, str]:
    """The channel block of this machine's convolution kernels and why it was chosen.

    ``cpuinfo`` (the text of /proc/cpuinfo) and ``machine`` (``platform.machine()``) are read from
    the system when not given. Without /proc/cpuinfo, numpy's own CPU feature detection is asked.
    """
    machine, flags = cpu_features(cpuinfo, machine)
    source = "/proc/cpuinfo"
    if not flags:
        flags, source = _numpy_flags(), "numpy's CPU feature detection"
    for flag, block, name in _X86_BLOCKS:
        if flag in flags:
            return block, f"{name} in {source}: the CPU kernels hold {block} channels per block"
    if "neon" in flags or "asimd" in flags or machine.startswith(("arm", "aarch64")):
        return _FALLBACK_BLOCK, f"NEON ({machine or 'ARM'}): 4 channels per 128-bit vector"
    return _FALLBACK_BLOCK, f"no AVX / AVX-512 found in {source} ({machine or 'unknown machine'}): 4 channels"


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, set[str]]:
    """(machine, feature flags of the first processor in /proc/cpuinfo), read from the system
    when not given; the flags are empty without /proc/cpuinfo."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    return machine, _cpuinfo_flags(cpuinfo)


def _cpuinfo_flags(text: str) -> set[str]:
    """The feature flags of the first processor listed (x86 ``flags``, ARM ``Features``)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.lower().split())
    return set()


def _numpy_flags() -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return set()
    names = {"AVX512F": "avx512f", "AVX2": "avx2", "AVX": "avx", "ASIMD": "asimd", "NEON": "neon"}
    return {flag for key, flag in names.items() if features.get(key)}


def width_candidates(size: int, keep: int, block: int, min_channels: int, least: int = 0) -> tuple[int, ...]:
    """The widths ``keep`` may be rounded to (see the module's rule); empty when it stays as it is.
    ``least``: no width below it (what the constraints of the selection, e.g. --max-layer-ratio, allow)."""
    if block <= 1 or keep >= size or keep % block == 0:
        return ()
    down = keep // block * block
    up = down + block
    found = []
    if down >= max(min_channels, block, least):
        found.append(down)
    if up < size:
        found.append(up)
    return tuple(found)


def round_widths(keeps: Sequence[int], sizes: Sequence[int], block: int, min_channels: int = 4,
                 weights: Sequence[float] | None = None, least: Sequence[int] | None = None) -> list[int]:
    """Kept widths rounded to multiples of ``block``, up or down, whichever keeps the total closest
    to the budget (the sum of ``keeps`` weighted by ``weights``; each 1 when not given).

    ``keeps[i]`` is what the selection keeps of a space of ``sizes[i]`` channels, ``weights[i]``
    the cost of one of its channels (MACs, ms, or 1 to count channels), ``least[i]`` the narrowest
    width the selection's constraints allow (rounding down never goes below it). Returns the new widths in
    the same order; the caller chooses which channels to put back or take away (by score).
    """
    if len(keeps) != len(sizes) or (weights is not None and len(weights) != len(keeps)):
        raise ValueError("round_widths: keeps, sizes and weights must have one entry per space")
    if block < 1:
        raise ValueError(f"round_widths: block {block} must be at least 1")
    weights = [1.0] * len(keeps) if weights is None else [float(w) for w in weights]
    out = [int(k) for k in keeps]
    least = [0] * len(keeps) if least is None else [int(n) for n in least]
    choices = {i: width_candidates(int(s), int(k), block, min_channels, least[i])
               for i, (k, s) in enumerate(zip(keeps, sizes))}
    drift = 0.0  # kept cost above the budget so far
    for i in sorted((i for i in choices if choices[i]), key=lambda i: (-weights[i], i)):
        k = int(keeps[i])
        # a width more than half a block away only when it brings the total closer to the budget
        fits = [w for w in choices[i]
                if 2 * abs(w - k) <= block or abs(drift + (w - k) * weights[i]) < abs(drift)]
        if not fits:
            continue
        # the candidate that leaves the running total closest to the budget; ties go up
        best = min(fits, key=lambda w: (abs(drift + (w - k) * weights[i]), -w))
        drift += (best - k) * weights[i]
        out[i] = best
    return out


def round_up_width(size: int, keep: int, block: int) -> int:
    """``keep`` rounded *up* to the block, or ``size`` (the space left whole) when the multiple
    above is not below it: what a ``--ratio`` / ``--threshold`` run rounds to. Up only keeps
    channels the ranking chose to remove (dead ones, in a sparsity-trained model); down would
    remove channels the ranking kept (live ones)."""
    if block <= 1 or keep >= size or keep % block == 0:
        return min(keep, size)
    up = -(-keep // block) * block
    return up if up < size else size


def round_width(size: int, keep: int, block: int, min_channels: int = 4) -> int:
    """One space alone: the nearer candidate within half a block (ties up), else ``keep``."""
    return round_widths([keep], [size], block, min_channels)[0]


def group_width(per: int, keep: int, block: int, min_channels: int = 1) -> int:
    """The width each group of a grouped conv keeps when the groups (``per`` channels each) are on
    the block: the multiple of ``block`` nearest ``keep`` (ties up), at least one block and
    ``min_channels``, or ``per`` (the whole group) when none is left below it.

    Measured with onnxruntime 1.32 (AVX-512, block 16), the grouped fixture at ratio 0.4: 16
    channels per group cut to 12 in / 8 out took the conv off the NCHWc kernels (its optimizer
    blocks a grouped conv only when each group's input and output widths are multiples of the
    block), and the model ran 0.82-0.88x at batch 1, 0.69-0.94x at batch 32 of the original's speed.
    """
    if block <= 1 or keep >= per:
        return keep
    down, least = keep // block * block, max(block, min_channels)
    if down == keep and keep >= least:
        return keep
    up = min(down + block, per)
    if down < least:
        return up
    return up if up - keep <= keep - down else down


def resolve_round_to(value: int | str) -> tuple[int, str]:
    """``--round-to`` as a block and the line that says where it came from: ``"auto"`` asks
    :func:`channel_block`, a number is taken as given."""
    if value == "auto":
        block, why = channel_block()
        return block, f"--round-to auto: {block} ({why})"
    try:
        block = int(value)
    except (TypeError, ValueError):
        block = 0
    if block < 1 or str(block) != str(value).strip():
        raise BnSlimError(f"--round-to {value!r}: pass auto (the machine's channel block) or a whole number >= 1")
    return block, f"--round-to {block}"


__all__ = ["channel_block", "width_candidates", "round_widths", "round_width", "round_up_width", "group_width", "resolve_round_to"]
