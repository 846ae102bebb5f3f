"""Input shapes (user-given or documented defaults) and shape inference on a weight-less copy."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import BnSlimError
from .fold import CONSTANT_ATTRS, FOLDABLE, evaluate
from .ops import CONSTANT, SHAPE

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1
DEFAULT_SPATIAL = 224


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list both)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["x:1,3,224,224", ...]`` -> ``{"x": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) < 1:
            raise BnSlimError(f"--input-shapes {spec!r} is not NAME:D0,D1,...; e.g. --input-shapes input:1,3,224,224")
        shapes[name] = shape
    return shapes


def resolve_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None,
                         source: str) -> tuple[dict[str, list[int]], list[str]]:
    """Concrete shape per input, and a note for every dimension the tool chose itself.

    Dynamic dimensions default to 1 on axis 0 (batch) and 224 elsewhere.
    """
    given = given or {}
    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    for name in given:
        if name not in names:
            raise BnSlimError(f"{source}: --input-shapes names '{name}', but the model's inputs are {sorted(names)}")
    shapes, notes = {}, []
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in given:
            if len(given[value.name]) != len(dims):
                raise BnSlimError(f"{source}: input '{value.name}' has rank {len(dims)}, --input-shapes gives {len(given[value.name])} dims")
            for axis, (dim, want) in enumerate(zip(dims, given[value.name])):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                    raise BnSlimError(f"{source}: input '{value.name}' fixes dim {axis} to {dim.dim_value}, --input-shapes "
                                      f"gives {want}; only dynamic dims can be set")
            shapes[value.name] = given[value.name]
            continue
        shape, chosen = [], False
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_SPATIAL)
                chosen = chosen or axis > 0  # a batch of 1 goes without saying
        if chosen:
            notes.append(f"input '{value.name}' has dynamic dims: using {'x'.join(map(str, shape))} "
                         f"(set them with --input-shapes {value.name}:{','.join(map(str, shape))})")
        shapes[value.name] = shape
    return shapes, notes


def skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """A copy of the model without large weights (they become typed inputs), inputs fixed.

    Shape inference needs the shapes of weights, not their values, except small constants
    such as Reshape targets; this keeps inference cheap on models of hundreds of MB.
    """
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    source, graph = model.graph, light.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    listed = {i.name for i in graph.input}
    for t in source.initializer:  # small constants (shape targets) stay; weights become typed inputs
        if _numel(t) <= 64:
            graph.initializer.append(t)
        elif t.name not in listed:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for value in graph.input:
        if input_shapes and value.name in input_shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    return light


def _numel(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None, source: str) -> dict[str, list]:
    """Shape of every tensor (ints where known, a symbol or None where not).

    ONNX shape inference does not see through ``Reshape(x, Concat(Gather(Shape(y), 0), -1))``
    (torch's ``x.view(x.size(0), -1)``); with the inputs fixed, every ``Shape`` of a static
    tensor is a constant, so a second pass with those Shape nodes replaced by their values
    recovers the rest.
    """
    light = skeleton(model, input_shapes)
    shapes = _infer(light, source)
    if _fold_shape_arithmetic(light, shapes):
        del light.graph.value_info[:]
        shapes = _infer(light, source)
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _fold_shape_arithmetic(light: onnx.ModelProto, shapes: dict[str, list]) -> bool:
    """Replace small integer computations on known shapes by Constant nodes; True if any.

    Works on the weight-less copy, where every input has a fixed shape, so ``Shape`` of any
    tensor with a static inferred shape is a constant too.
    """
    from onnx import numpy_helper

    known = {t.name: numpy_helper.to_array(t) for t in light.graph.initializer}
    opset = next((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")), 13)
    folded = False
    for node in light.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == CONSTANT:
            if "value" in attrs:
                known[node.output[0]] = numpy_helper.to_array(attrs["value"])
            for name, dtype in CONSTANT_ATTRS.items():
                if name in attrs:
                    known[node.output[0]] = np.asarray(attrs[name], dtype)
            continue
        if node.op_type not in FOLDABLE or len(node.output) != 1:
            continue
        if node.op_type == SHAPE:
            dims = shapes.get(node.input[0])
            if not _is_static(dims):
                continue
            value = np.array(dims[attrs.get("start", 0):attrs.get("end")], np.int64)
        else:
            args = [known.get(i) if i else None for i in node.input]
            if any(i and (a is None or a.size > 64) for i, a in zip(node.input, args)):
                continue
            value = evaluate(node.op_type, args, attrs, opset)
            if value is None:
                continue
        known[node.output[0]] = value
        node.op_type, node.domain = CONSTANT, ""
        del node.input[:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(value), node.output[0])))
        folded = True
    return folded


def _is_static(shape: list | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _infer(light: onnx.ModelProto, source: str) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise BnSlimError(f"{source}: shape inference fails ({str(exc).splitlines()[0]}); "
                          "check the model with onnx.checker or fix --input-shapes") from exc
    shapes: dict[str, list] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in tensor_type.shape.dim]
    return shapes
