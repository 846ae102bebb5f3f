"""Property-based fuzz: random CNN graphs from the supported op set, pruned and checked.

Each drawn graph has BatchNorms whose "dead" channels have gamma = 0 exactly and a beta that is
0 or, as trained networks leave it, not. Properties:

- pruning the dead channels with ``exact_borders`` reproduces the original within 1e-5 of the
  output's range, whatever the betas (gates, pads with values, pools counting padding, 1x1
  convs with pads, overlapping ConvTranspose: what cannot be compensated exactly is kept);
- without ``exact_borders``, the output is that exact too unless the report names an
  approximate layer: no approximation goes unnamed;
- pruning at a random ratio gives a model that passes the checker, runs in onnxruntime and
  keeps its output shapes;
- never larger (issue 16, :func:`never_larger`): the model written by the bias-folding and the
  ratio runs is no larger on disk than the input, or none is written and one line says why.

Some graphs store their conv weights as fp16 behind ``Cast`` (kept so: :func:`assert_storage_kept`),
some have an ``If`` whose branches read a pruned tensor and a conv weight from the outer scope
(the tensor's channels are blocked, the weight copied before slicing). Some graphs lose their
node names (valid ONNX). ``make fuzz`` runs many more examples (FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.ir.model_io import graphs
from tests.graphs import Builder, fp16_behind_casts, random_input, run

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
# activations with f(0) = 0: a dead channel stays exactly 0 through them, borders included
ACTIVATIONS = ["Relu", "LeakyRelu", "Tanh", "Clip", "Identity", "HardSwish", "Elu"]
BLOCKS = ["cba", "residual", "concat", "concat-input", "se", "depthwise", "pool", "pad", "resize", "mul-const", "up", "csp",
          "slice", "grouped", "preact", "pad-value", "avgpool", "conv1x1-pad", "convt-overlap", "reader-concat", "plain",
          "if-read"]
HEADS = ["gap-gemm", "flatten-gemm", "conv", "reshape-gemm", "matmul"]


class Net:
    """Draws layers into a Builder while tracking the current tensor and its channel count."""

    def __init__(self, draw, opset: int, size: int):
        self.draw, self.b = draw, Builder(seed=draw(st.integers(0, 2**16)), opset=opset)
        self.beta_dead = draw(st.sampled_from([0.0, None]))  # None: dead channels keep a random beta
        self.size = self.input_size = size
        self.c = self.width()
        self.x = self.cba("x", 3, self.c)

    def width(self) -> int:
        return self.draw(st.integers(2, 10))

    def act(self, x: str) -> str:
        op = self.draw(st.sampled_from(ACTIVATIONS if self.b.opset >= 14 else ACTIVATIONS[:-2] + ["Elu"]))
        if op == "Clip":
            if self.b.opset < 11:
                return self.b.op("Clip", [x], min=0.0, max=6.0)
            return self.b.op("Clip", [x, self.b.const(np.float32(0.0)), self.b.const(np.float32(6.0))])
        return self.b.op(op, [x], **({"alpha": 0.2} if op == "LeakyRelu" else {}))

    def bn(self, x: str, c: int) -> str:
        dead = np.flatnonzero(np.array(self.draw(st.lists(st.booleans(), min_size=c, max_size=c))))
        return self.b.bn(x, c, dead, beta_dead=self.beta_dead)

    def cba(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        return self.act(self.bn(self.b.conv(x, cin, cout, k=k, group=group), cout))

    def block(self, kind: str) -> None:
        b, x, c = self.b, self.x, self.c
        if kind == "cba":
            w = self.width()
            self.x, self.c = self.cba(x, c, w, k=self.draw(st.sampled_from([1, 3]))), w
        elif kind == "plain":  # a conv that never had a BN (a bias, maybe an activation)
            w = self.width()
            y = b.conv(x, c, w, k=self.draw(st.sampled_from([1, 3])), bias=True)
            self.x, self.c = (self.act(y) if self.draw(st.booleans()) else y), w
        elif kind == "residual":
            mid = self.width()
            self.x = b.op("Add", [x, self.bn(b.conv(self.cba(x, c, mid), mid, c), c)])
        elif kind == "concat-input" and self.size == self.input_size:  # the graph input joins in
            self.x, self.c = b.op("Concat", [x, "x"], axis=1), c + 3
        elif kind in ("concat", "concat-input"):
            w = self.width()
            self.x, self.c = b.op("Concat", [x, self.cba(x, c, w)], axis=1), c + w
        elif kind == "se":
            hidden = max(1, c // 2)
            s = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [x]), c, hidden, k=1, bias=True)])
            gate = b.op("Sigmoid", [b.conv(s, hidden, c, k=1, bias=True)])
            self.x = b.op("Mul", [x, gate])
        elif kind == "depthwise":
            self.x = self.cba(x, c, c, k=3, group=c)
        elif kind == "pool":
            op = self.draw(st.sampled_from(["MaxPool", "AveragePool"]))
            self.x = b.op(op, [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        elif kind == "pad":
            pads = [0, 0, 1, 1, 0, 0, 1, 1]
            if b.opset < 11:
                self.x = b.op("Pad", [x], pads=pads)
            else:
                self.x = b.op("Pad", [x, b.const(np.array(pads, np.int64))])
            self.size += 2
        elif kind == "resize" and b.opset >= 11:
            roi = "" if b.opset >= 13 else b.const(np.zeros(0, np.float32))
            self.x = b.op("Resize", [x, roi, b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
            self.size *= 2
        elif kind == "up":  # UNet decoder: ConvTranspose, stride 2
            w = self.width()
            weight = b.const(b.rng.standard_normal((c, w, 2, 2)).astype(np.float32) * 0.3)
            up = b.op("ConvTranspose", [x, weight], kernel_shape=[2, 2], strides=[2, 2])
            self.x, self.c = self.act(self.bn(up, w)), w
            self.size *= 2
        elif kind == "csp" and c % 2 == 0 and b.opset >= 11:  # YOLO C2f: split, bottleneck on one half, concat
            h = c // 2
            sizes = b.const(np.array([h, h], np.int64))
            parts = b.op("Split", [x, sizes] if b.opset >= 13 else [x], n_out=2, axis=1,
                         **({} if b.opset >= 13 else {"split": [h, h]}))
            self.x, self.c = b.op("Concat", [parts[0], parts[1], self.cba(parts[1], h, h)], axis=1), 3 * h
        elif kind == "slice" and c > 2 and b.opset >= 10:
            bounds = [b.const(np.array(v, np.int64)) for v in ([1], [c - 1], [1])]
            self.x, self.c = b.op("Slice", [x, *bounds]), c - 2
        elif kind == "grouped" and c % 2 == 0:  # ResNeXt: 2 groups
            w = 2 * self.draw(st.integers(1, 5))
            self.x, self.c = self.cba(x, c, w, k=self.draw(st.sampled_from([1, 3])), group=2), w
        elif kind == "preact":  # pre-activation: a BN is one reader of x, the shortcut reads x raw
            branch = b.conv(self.act(self.bn(x, c)), c, c)
            self.x = b.op("Add", [x, branch])
        elif kind == "reader-concat":  # DenseNet: a BN reads the concat, which a raw conv reads too
            w = self.width()
            cat = b.op("Concat", [x, self.cba(x, c, w)], axis=1)
            left = b.conv(self.act(self.bn(cat, c + w)), c + w, c, k=1, pad=0)
            self.x = b.op("Add", [left, b.conv(cat, c + w, c, k=1, pad=0)])
        elif kind == "pad-value" and b.opset >= 11:  # tf2onnx: explicit Pad with a value, unpadded conv
            pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
            padded = b.op("Pad", [x, pads, b.const(np.float32(self.draw(st.sampled_from([0.0, 0.5]))))])
            w = self.width()
            self.x, self.c = self.act(self.bn(b.conv(padded, c, w, k=3, pad=0), w)), w
        elif kind == "avgpool":
            self.x = b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                          count_include_pad=self.draw(st.sampled_from([0, 1])))
        elif kind == "conv1x1-pad":
            w = self.width()
            self.x, self.c = self.act(self.bn(b.conv(x, c, w, k=1, pad=1), w)), w
            self.size += 2
        elif kind == "convt-overlap":  # ConvTranspose k3 s2 p1 op1: taps overlap unevenly
            w = self.width()
            weight = b.const(b.rng.standard_normal((c, w, 3, 3)).astype(np.float32) * 0.3)
            up = b.op("ConvTranspose", [x, weight], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                      output_padding=[1, 1])
            self.x, self.c = self.act(self.bn(up, w)), w
            self.size *= 2
        elif kind == "if-read":  # an If whose branches read a pruned tensor and a conv weight from outside
            w = self.width()
            y = self.cba(x, c, w)
            weight = next(n for n in reversed(b.nodes) if n.op_type == "Conv").input[1]
            then = helper.make_graph([helper.make_node("ReduceMean", [y], ["if_then"], keepdims=0)], "then", [],
                                     [helper.make_tensor_value_info("if_then", TensorProto.FLOAT, [])])
            other = helper.make_graph([helper.make_node("ReduceMean", [weight], ["if_else"], keepdims=0)], "else", [],
                                      [helper.make_tensor_value_info("if_else", TensorProto.FLOAT, [])])
            s = b.name("if_out")
            cond = b.const(np.array(self.draw(st.booleans())), "cond")
            b.nodes.append(helper.make_node("If", [cond], [s], then_branch=then, else_branch=other, name=b.name("If")))
            self.x, self.c = b.op("Add", [y, s]), w
        elif kind == "mul-const":
            scale = b.rng.uniform(0.5, 2.0, (c, 1, 1)).astype(np.float32)
            self.x = b.op("Mul", [x, b.const(scale)])

    def head(self, kind: str) -> str:
        b, x, c = self.b, self.x, self.c
        if kind == "gap-gemm":
            return b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, 4)
        if kind == "flatten-gemm":
            return b.gemm(b.op("Flatten", [x], axis=1), c * self.size * self.size, 4, trans_b=False)
        if kind == "reshape-gemm":
            flat = b.op("Reshape", [x, b.const(np.array([0, -1], np.int64))])
            return b.gemm(flat, c * self.size * self.size, 4)
        if kind == "matmul":
            flat = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
            return b.op("MatMul", [flat, b.const(b.rng.standard_normal((c, 4)).astype(np.float32))])
        return b.conv(x, c, 2, k=1)


def assert_storage_kept(model: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """fp16 weights stay fp16 behind their Casts (only a bias that absorbed removed constants is
    written as float32, under the Cast's name), and the model is no larger than the input."""
    from onnxslim_bn.ir.model_io import weight_bytes

    stored = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    after = {t.name: t.data_type for t in pruned.graph.initializer}
    for name in stored:
        assert after.get(name) == TensorProto.FLOAT16 or after.get(name + "_f32") == TensorProto.FLOAT \
            or name not in {n for node in pruned.graph.node for n in node.input}, name
    assert not any(name.endswith("_folded") for g in graphs(pruned.graph) for name in (t.name for t in g.initializer))
    assert weight_bytes(pruned) <= weight_bytes(model)


def never_larger(model: onnx.ModelProto, **options):
    """``prune(model, **options)``, held to issue 16: the model it writes is no larger on disk than
    its input (names it gave nameless nodes, metadata, shape annotations, weights copied into
    If branches all count), or it writes none and says why in one line. None when it declines."""
    try:
        result = prune(model, **options)
    except BnSlimError as err:
        if "would exceed the input's" not in str(err):
            raise
        assert len(str(err).splitlines()) == 1 and "nothing was written" in str(err), err
        event("declined to write a larger model")
        return None
    assert result.model.ByteSize() <= model.ByteSize(), (result.model.ByteSize(), model.ByteSize())
    assert result.report.after.size_bytes == result.model.ByteSize()
    return result


@st.composite
def networks(draw):
    opset = draw(st.sampled_from([9, 11, 13, 15, 17]))
    size = draw(st.sampled_from([4, 6]))
    net = Net(draw, opset, size)
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5)):
        net.block(kind)
    out = net.head(draw(st.sampled_from(HEADS)))
    model = net.b.model({"x": [2, 3, size, size]}, [out])
    if draw(st.integers(0, 3)) == 0:  # conv weights stored as fp16 behind Cast(to=FLOAT)
        model = fp16_behind_casts(model)
    if draw(st.booleans()):  # node names are optional in ONNX
        for node in model.graph.node:
            if draw(st.booleans()):
                node.name = ""
    return model, [2, 3, size, size], net.size


@settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks(), st.floats(0.05, 0.95))
def test_random_graphs_prune_to_valid_faithful_models(drawn, ratio):
    model, shape, final_size = drawn
    note(" ".join(f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in model.graph.node))
    note(str({t.name: (list(t.dims), onnx.numpy_helper.to_array(t).ravel()[:8].astype(float).round(3).tolist()) for t in model.graph.initializer}))
    x = random_input(shape)
    original = run(model, {"x": x})[0]
    # 1e-5 of the output's range; a head that averages a large map (repeated upsampling) sums a
    # removed channel's constant over H*W float32 positions, where the bias adds it once
    tolerance = 1e-5 * float(np.abs(original).max()) * max(1.0, final_size**2 / 256) + 1e-6
    exact_options = dict(threshold=1e-6, min_channels=1, round_to=1, exact_borders=True, compensation="bias")
    try:
        try:
            exact = prune(model, **exact_options)
        except BnSlimError as err:  # growth (a weight sliced for its layer, read whole in an If): declined,
            if "would exceed the input's" not in str(err):  # and exact when accepted
                raise
            event("exact run declined a larger model")
            exact = prune(model, **exact_options, allow_growth=True)
    except BnSlimError as err:  # legitimate only when nothing at all can be pruned
        assert "blocked" in str(err) or "nothing to prune" in str(err) or "no BatchNorm" in str(err), err
        event("nothing prunable")
        return
    event(f"removed {min(exact.report.removed_channels, 5)}+ dead channels" if exact.report.removed_channels >= 5
          else f"removed {exact.report.removed_channels} dead channels")
    got = run(exact.model, {"x": x})[0]
    assert got.shape == original.shape
    np.testing.assert_allclose(got, original, atol=tolerance, rtol=0)
    plain = never_larger(model, threshold=1e-6, min_channels=1, round_to=1, compensation="bias")
    if plain is None:  # what the cut adds (a bias, a channel selection, a weight's second slice) outweighs it
        return
    assert plain.report.surgery.uncompensated_channels == 0
    if any(n.op_type == "If" for n in model.graph.node):
        event("an If reading outer-scope tensors")
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):  # storage types kept
        event("fp16 weights behind Casts")
        assert_storage_kept(model, plain.model)
    if not plain.report.surgery.approximate:  # nothing named approximate: then it is exact
        np.testing.assert_allclose(run(plain.model, {"x": x})[0], original, atol=tolerance, rtol=0)
    else:
        event("approximation named")
    rough = never_larger(model, ratio=ratio)  # checker, shape inference and onnxruntime run inside
    if rough is not None:
        assert run(rough.model, {"x": x})[0].shape == original.shape
