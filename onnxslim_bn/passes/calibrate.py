"""Calibration as a stage: run a model over calibration samples in chunks and reduce what
later stages need on the fly, never holding every sample's activations at once.

Two reducers:

- :class:`Moments` -- per-channel running mean and variance of a tensor (channel axis 1),
  merged chunk by chunk (Chan et al.'s parallel update);
- :class:`Gram` -- for a layer's input, the Gram matrix ``AᵀA`` of its rows ``A`` (im2col
  patches of a Conv's input at sampled output positions, or the rows a Gemm / MatMul reads),
  with a column of ones appended for the bias, and optionally ``AᵀY`` and ``ΣY²`` against
  target rows ``Y`` taken at the same positions. At most ``max_positions`` positions per
  sample are used, drawn with a seed that depends only on (seed, layer, sample index): the
  same positions whatever the chunking, and the same in two models with equal spatial sizes.

:func:`calibrate` runs one model and feeds both kinds of reducer; reconstruction
(``reconstruct.py``) feeds :class:`Gram` from two models (pruned inputs, original targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..ir import runtime
from ..passes import verify


# ------------------------------------------------------------------------------ row extraction
@dataclass(frozen=True)
class Patches:
    """How a layer turns its input into rows: a Conv's im2col patch per output position
    (``kernel`` given), or the feature vector a Gemm / MatMul reads (``kernel`` empty: the
    input is [batch, ..., features] and every position of the middle axes is one row).

    Rows are laid out [groups, channels per group * kernel] to match a Conv weight
    ``[C_out, C_in / group, *kernel]`` reshaped per group."""

    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin values then end values, as ONNX writes them
    dilations: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def for_conv(cls, node: onnx.NodeProto, weight_shape: tuple[int, ...],
                 input_spatial: tuple[int, ...] | None) -> Patches:
        """The patches of a Conv node (``input_spatial`` is needed for ``auto_pad`` SAME only)."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = tuple(int(k) for k in weight_shape[2:])
        rank = len(kernel)
        strides = tuple(attrs.get("strides", [1] * rank))
        dilations = tuple(attrs.get("dilations", [1] * rank))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER") and input_spatial is not None:
            begin, end = [], []
            for size, k, s, d in zip(input_spatial, kernel, strides, dilations):
                total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else large)
                end.append(large if auto == "SAME_UPPER" else small)
            pads = tuple(begin + end)
        elif auto == "VALID":
            pads = (0,) * (2 * rank)
        else:
            pads = tuple(attrs.get("pads", [0] * (2 * rank)))
        return cls(kernel, strides, pads, dilations, int(attrs.get("group", 1)))

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    def output_spatial(self, input_spatial: tuple[int, ...]) -> tuple[int, ...]:
        if not self.is_conv:
            return input_spatial
        rank = len(self.kernel)
        return tuple((size + self.pads[i] + self.pads[i + rank] - (self.kernel[i] - 1) * self.dilations[i] - 1)
                     // self.strides[i] + 1 for i, size in enumerate(input_spatial))

    def positions(self, x_shape: tuple[int, ...]) -> int:
        """Output positions per sample for an input of this shape."""
        spatial = tuple(x_shape[2:]) if self.is_conv else tuple(x_shape[1:-1])
        return int(np.prod(self.output_spatial(spatial), dtype=np.int64))

    def rows(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rows of ``x`` [n, ...] at ``positions`` [n, P] (flat output-position indices):
        [n, P, groups, width per group]."""
        n, p = positions.shape
        if not self.is_conv:
            flat = x.reshape(n, -1, x.shape[-1])
            picked = np.take_along_axis(flat, positions[:, :, None], axis=1)
            return picked.reshape(n, p, self.groups, -1)
        rank = len(self.kernel)
        spatial_in = tuple(x.shape[2:])
        coords = np.unravel_index(positions, self.output_spatial(spatial_in))  # rank arrays of [n, P]
        taps, inside = [], np.ones((n, p, *self.kernel), bool)
        for i in range(rank):  # input index [n, P, 1.., k_i, ..1] of every kernel tap on axis i
            shape = [1] * rank
            shape[i] = self.kernel[i]
            tap = (coords[i][..., None] * self.strides[i] - self.pads[i]
                   + np.arange(self.kernel[i]) * self.dilations[i]).reshape(n, p, *shape)
            inside &= (tap >= 0) & (tap < spatial_in[i])
            taps.append(np.clip(tap, 0, spatial_in[i] - 1))
        batch = np.arange(n).reshape(n, 1, *([1] * rank))
        gathered = np.moveaxis(x, 1, -1)[(batch, *taps)]  # [n, P, *kernel, C]; padding reads as zero:
        gathered *= inside[..., None]
        gathered = np.moveaxis(gathered, -1, 2)  # [n, P, C, *kernel]
        return gathered.reshape(n, p, self.groups, -1)


def sample_positions(total: int, max_positions: int, seed: int, layer: int, samples: np.ndarray) -> np.ndarray:
    """[len(samples), P] flat positions (one id per entry of the tensor's axis 0): all of them
    when ``total <= max_positions``, else ``max_positions`` drawn without replacement with a
    generator seeded by (seed, layer, sample)."""
    if total <= max_positions:
        return np.broadcast_to(np.arange(total), (len(samples), total)).copy()
    out = np.empty((len(samples), max_positions), np.int64)
    for row, sample in enumerate(samples):
        rng = np.random.default_rng([seed, layer, int(sample)])
        out[row] = np.sort(rng.choice(total, max_positions, replace=False))
    return out


def _ids(samples: np.ndarray, n: int) -> np.ndarray:
    """One id per entry of axis 0: the sample numbers, or (when axis 0 is not the batch axis,
    as in a sequence-first [T, N, C] tensor) numbers derived from the chunk's first sample."""
    return samples if len(samples) == n else int(samples[0]) * 1_000_003 + np.arange(n)


# ------------------------------------------------------------------------------------ reducers
@dataclass
class Moments:
    """Running per-channel mean and variance (axis 1 is the channel axis)."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        values = np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(-1, x.shape[1])
        n = len(values)
        if n == 0:
            return
        mean = values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


# rows a Gram holds before reducing them (bytes of the row block): one product over many rows, not
# one per chunk -- a refit chunk of a ResNet-50 is 2 samples x 64 positions, and reducing 128 rows of
# a 4,609-wide layer at a time cost 6x the arithmetic in writing and adding the 4,609² products
PENDING_BYTES = 64 * 2**20


@dataclass
class Gram:
    """``AᵀA`` per group over sampled rows ``A`` (with a trailing column of ones, so that a
    least-squares solve fits a bias too), and with targets ``Y``: the residual ``R = Y - A W0``
    of a current solution ``W0`` reduced as ``AᵀR`` and ``ΣR²``, plus ``ΣY`` and ``ΣY²``.

    Solving for the correction to ``W0`` (rather than for the weights) keeps an exact ``W0``
    exact whatever the rounding of the sums. Rows are gathered up to ``PENDING_BYTES`` and
    reduced together; reading a sum reduces what is left."""

    patches: Patches
    max_positions: int
    seed: int = 0
    layer: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # ata, atr, rr, ysum, yy (see the properties)
    rows: int = 0
    positions_per_sample: int = 0
    pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = field(default_factory=list)

    @property
    def ata(self) -> np.ndarray | None:  # [groups, d + 1, d + 1]
        return self._sum("ata")

    @property
    def atr(self) -> np.ndarray | None:  # [groups, d + 1, outputs per group]
        return self._sum("atr")

    @property
    def rr(self) -> np.ndarray | None:  # [groups, outputs per group]: sum of squared residuals
        return self._sum("rr")

    @property
    def ysum(self) -> np.ndarray | None:  # [groups, outputs per group]: sum of the targets
        return self._sum("ysum")

    @property
    def yy(self) -> np.ndarray | None:  # [groups, outputs per group]: sum of squared targets
        return self._sum("yy")

    def _sum(self, key: str) -> np.ndarray | None:
        self._reduce()
        return self.sums.get(key)

    def positions(self, x_shape: tuple[int, ...], samples: np.ndarray) -> np.ndarray:
        total = self.patches.positions(x_shape)
        self.positions_per_sample = min(total, self.max_positions)
        return sample_positions(total, self.max_positions, self.seed, self.layer, _ids(samples, x_shape[0]))

    def update(self, x: np.ndarray, samples: np.ndarray, targets: np.ndarray | None = None,
               w0: np.ndarray | None = None) -> None:
        """Add the rows of input chunk ``x`` (samples numbered ``samples``). ``targets``: the
        target rows at the same positions, [n, P, outputs] (see :meth:`target_rows`); ``w0``:
        the current solution [groups, d + 1, outputs per group] (default zero).

        Each block's products are formed in float32 when the rows are wide (a 3x3 conv over 512
        channels: 4,609 columns), in float64 otherwise, and summed in float64."""
        pos = self.positions(x.shape, samples)
        rows = self.patches.rows(x, pos)  # [n, P, g, d]
        n, p, g, d = rows.shape
        dtype = np.float64 if d <= 64 else np.float32
        a = np.empty((g, n * p, d + 1), dtype)
        a[:, :, :d] = rows.reshape(n * p, g, d).transpose(1, 0, 2)
        a[:, :, d] = 1.0
        del rows
        y = None if targets is None else np.asarray(targets, dtype).reshape(n * p, g, -1).transpose(1, 0, 2)  # [g, R, o]
        if self.pending and (self.pending[-1][2] is not w0 or (self.pending[-1][1] is None) != (y is None)):
            self._reduce()
        self.pending.append((a, y, w0))
        self.rows += n * p
        if sum(block.nbytes for block, _, _ in self.pending) >= PENDING_BYTES:
            self._reduce()

    def _reduce(self) -> None:
        """Add the pending rows' products to the sums (one product over all of them)."""
        if not self.pending:
            return
        blocks, w0 = self.pending, self.pending[0][2]
        self.pending = []
        a = blocks[0][0] if len(blocks) == 1 else np.concatenate([b[0] for b in blocks], axis=1)
        g, dtype = a.shape[0], a.dtype
        sums = {"ata": np.einsum("grd,gre->gde", a, a) if g > 1 else (a[0].T @ a[0])[None]}
        if blocks[0][1] is not None:
            y = blocks[0][1] if len(blocks) == 1 else np.concatenate([b[1] for b in blocks], axis=1)
            sums["ysum"], sums["yy"] = y.sum(1, dtype=np.float64), (y.astype(np.float64) ** 2).sum(1)
            if w0 is not None:
                w = w0.astype(dtype)
                y = y - (np.einsum("grd,gdo->gro", a, w) if g > 1 else (a[0] @ w[0])[None])
            sums["atr"] = np.einsum("grd,gro->gdo", a, y) if g > 1 else (a[0].T @ y[0])[None]
            sums["rr"] = (y.astype(np.float64) ** 2).sum(1)
        del a
        for key, value in sums.items():
            old = self.sums.get(key)
            self.sums[key] = value.astype(np.float64) if old is None else old + value

    def spread(self) -> float:
        """Sum over outputs of the targets' squared deviation from their mean."""
        return float(self.yy.sum() - (self.ysum**2).sum() / max(self.rows, 1))

    def residual(self, delta: np.ndarray | None = None) -> float:
        """Sum of squared residuals after adding ``delta`` to the current solution."""
        if delta is None:
            return float(self.rr.sum())
        return float(self.rr.sum() - 2 * np.einsum("gdo,gdo->", delta, self.atr)
                     + np.einsum("gdo,gdo->", delta, np.matmul(self.ata, delta)))

    def target_rows(self, y: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """A layer's output chunk ``y`` ([n, C, *spatial] for a Conv, [n, ..., C] for a Gemm /
        MatMul) at this layer's sampled positions: [n, P, C]."""
        if self.patches.is_conv:
            flat = y.reshape(y.shape[0], y.shape[1], -1)  # [n, C, positions]
            total = flat.shape[2]
            pos = sample_positions(total, self.max_positions, self.seed, self.layer, _ids(samples, y.shape[0]))
            return np.take_along_axis(flat, pos[:, None, :], axis=2).transpose(0, 2, 1)
        flat = y.reshape(y.shape[0], -1, y.shape[-1])
        pos = sample_positions(flat.shape[1], self.max_positions, self.seed, self.layer, _ids(samples, y.shape[0]))
        return np.take_along_axis(flat, pos[:, :, None], axis=1)


# ------------------------------------------------------------------------------------ the stage
@dataclass
class Calibration:
    moments: dict[str, Moments] = field(default_factory=dict)
    grams: dict[str, Gram] = field(default_factory=dict)
    samples: int = 0


def calibrate(model: onnx.ModelProto, feeds: dict[str, np.ndarray], moments: list[str] = (),
              grams: dict[str, Patches] | None = None, max_positions: int = 64, seed: int = 0,
              what: str = "the model") -> Calibration:
    """Run ``model`` over ``feeds`` in chunks and reduce: per-channel moments of the tensors
    named in ``moments``, and the Gram matrix of the rows of each tensor in ``grams`` (tensor
    name -> how the layer reading it makes rows)."""
    grams = grams or {}
    names = list(dict.fromkeys([*moments, *grams]))
    sess = runtime.session(model, what, extra_outputs=names)
    result = Calibration({n: Moments() for n in moments},
                         {n: Gram(p, max_positions, seed, i) for i, (n, p) in enumerate(grams.items())})
    for samples, outputs in runtime.stream(sess, feeds, names, verify.static_batch(model)):
        values = dict(zip(names, outputs))
        for name, reducer in result.moments.items():
            reducer.update(values[name])
        for name, reducer in result.grams.items():
            reducer.update(values[name], samples)
        result.samples += len(samples)
    return result
