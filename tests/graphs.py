"""Tiny ONNX graphs built with onnx.helper, and the onnxruntime helpers the tests share."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Accumulates nodes and initializers; names are generated so tests stay short."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower() + "_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, pad: int | None = None, group: int = 1,
             bias: bool = False, stride: int = 1) -> str:
        pad = k // 2 if pad is None else pad
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3, "w")
        inputs = [x, w] + ([self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b")] if bias else [])
        return self.op("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, group=group, strides=[stride, stride])

    def bn(self, x: str, c: int, dead: np.ndarray | None = None, beta_dead: float | None = 0.0) -> str:
        """BatchNorm with random parameters; ``dead`` channels get gamma 0 (and beta ``beta_dead``
        when given, else a random beta)."""
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta = self.rng.standard_normal(c).astype(np.float32) * 0.5
        mean = self.rng.standard_normal(c).astype(np.float32) * 0.1
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        if dead is not None:
            gamma[dead] = 0.0
            if beta_dead is not None:
                beta[dead] = beta_dead
        params = [self.const(p, "bn") for p in (gamma, beta, mean, var)]
        attrs = {"spatial": 1} if self.opset < 9 else {}
        return self.op("BatchNormalization", [x, *params], epsilon=1e-5, **attrs)

    def gemm(self, x: str, k: int, n: int, trans_b: bool = True, bias: bool = True) -> str:
        shape = (n, k) if trans_b else (k, n)
        w = self.const(self.rng.standard_normal(shape).astype(np.float32) * 0.2, "gw")
        inputs = [x, w] + ([self.const(self.rng.standard_normal(n).astype(np.float32) * 0.1, "gb")] if bias else [])
        return self.op("Gemm", inputs, transB=int(trans_b))

    def model(self, inputs: dict[str, list], outputs: list[str], output_shapes: dict[str, list] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 8 if self.opset <= 17 else model.ir_version)
        inferred = onnx.shape_inference.infer_shapes(model).graph
        inferred = {v.name: v for v in list(inferred.value_info) + list(inferred.output)}
        for out in model.graph.output:  # graph outputs need a shape to pass the checker
            if output_shapes and out.name in output_shapes:
                out.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, output_shapes[out.name]))
            else:
                out.type.CopyFrom(inferred[out.name].type)
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_input(shape: list[int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def weight_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Node name -> shape of its weight (input 1) for Conv / Gemm / MatMul."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.name: inits.get(n.input[1]) for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}


def fp16_behind_casts(model: onnx.ModelProto, ops: tuple[str, ...] = ("Conv",)) -> onnx.ModelProto:
    """Every weight and bias of ``ops`` stored as float16 and read through Cast(to=FLOAT)."""
    inits = {t.name: t for t in model.graph.initializer}
    casts = []
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        for i in range(1, len(node.input)):
            tensor = inits[node.input[i]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
            casts.append(helper.make_node("Cast", [tensor.name], [tensor.name + "_f32"], to=TensorProto.FLOAT,
                                          name=tensor.name + "_cast"))
            node.input[i] = tensor.name + "_f32"
    renamed = {c.input[0]: c.output[0] for c in casts}

    def follow(graph: onnx.GraphProto) -> None:  # If / Loop bodies reading a weight read its Cast too
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    for inner in sub.node:
                        inner.input[:] = [renamed.get(n, n) for n in inner.input]
                    follow(sub)

    follow(model.graph)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def fold_bns(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same function with every BatchNormalization that is the only reader of a Conv with
    constant weights folded into that Conv (as torch.onnx.export does): W * s, (b - mean) * s + beta."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}

    def count(nodes):  # reads inside If / Loop bodies count too: a weight one of them reads stays as it is
        for node in nodes:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    count(sub.node)

    count(graph.node)
    producer = {o: n for n in graph.node for o in n.output}
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers.get(bn.input[0]) != 1 or conv.input[1] not in inits \
                or any(name not in inits for name in bn.input[1:5]) or readers.get(conv.input[1]) != 1:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None, None, None]).astype(np.float32),
                                                              conv.input[1]))
        bias_name = f"{conv.input[1]}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32), bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
    return out


def without_carriers(monkeypatch) -> None:
    """Bias folding as it is where no kept channel can carry the removed constants
    (onnxslim_bn.passes.select.carriers): exact inside, approximate at the borders."""
    monkeypatch.setattr("onnxslim_bn.passes.surgery.carriers",
                        lambda plan, analysis, name, values, removed: np.zeros_like(removed))
    monkeypatch.setattr("onnxslim_bn.passes.select.hold_carriers", lambda plan, dead, block, *rest: 0)
