"""A quantized model as an ONNX file (opset 21) that onnxruntime runs as it is (docs/export.md).

Each DSConv weight is a blocked `DequantizeLinear(axis=1, block_size=B)` of its VQK codes
(INT4 at 2-4 bits, packed two to a byte; INT8 at 5-8) and its KDS scales (float16 where the
recipe stores them so, cast to float32 once, since the product alpha * q must be float32 to be
exact); flat layouts dequantize the (O, I*kh*kw) codes and reshape. Each BFP input is a call of
the `dsq.BFP` local function (dsq.exporters.onnx_bfp) with the layer's bits and block as
attributes. Everything else is what torch's own exporter makes of the model.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnxscript.values import Op, Opset

from ..errors import DsqError
from ..fileio import atomic_path
from .layers import export_layers
from .onnx_bfp import DOMAIN, DOMAIN_VERSION, function_name, function_protos

OPSET = 21
METADATA_PREFIX = "dsq."  # metadata_props keys: dsq.<name>, each value JSON
INT4_BITS = 4  # layers of at most this many bits store their codes as INT4
_PLACEHOLDER = Opset(DOMAIN, DOMAIN_VERSION)


def _schema(name: str, inputs: list[str], attributes: list[str]) -> onnx.defs.OpSchema:
    """A schema for a node that only lives between torch's exporter and `_finish` (attributes
    are whole numbers, `layer` a string)."""
    schema = onnx.defs.OpSchema
    formal, attribute, kind = schema.FormalParameter, schema.Attribute, schema.AttrType
    return schema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[formal(i, "T") for i in inputs],
        outputs=[formal("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(int8)"], "")],
        attributes=[attribute(a, kind.STRING if a == "layer" else kind.INT, "") for a in attributes],
    )


_DEQUANTIZE = Op(
    _PLACEHOLDER, "BlockDequantize", _schema("BlockDequantize", ["codes", "scales"], ["block", "bits", "layer"])
)
_BFP_CALLS = {name: Op(_PLACEHOLDER, name, _schema(name, ["x"], ["bits", "block"])) for name in ("BFP", "BFPRagged")}


def _dequantize_onnx(codes, scales, block: int, bits: int, layer: str):
    return _DEQUANTIZE(codes, scales, block=block, bits=bits, layer=layer)


def _bfp_onnx(x, bits: int, block: int):
    channels = x.shape[1]
    if not isinstance(channels, int):
        raise DsqError("export: a BFP input has a dynamic channel count; report this as a dsq bug")
    return _BFP_CALLS[function_name(channels, block)](x, bits=bits, block=block)


TRANSLATIONS = {
    torch.ops.dsq.block_dequantize.default: _dequantize_onnx,
    torch.ops.dsq.bfp.default: _bfp_onnx,
}


def _float_input(example_input) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32 or example_input.dim() < 2:
        raise DsqError(
            "export needs an example input: one float32 tensor (N, C, ...) such as a batch of images, got "
            f"{type(example_input).__name__}"
        )
    return example_input


def to_onnx(
    qmodel: nn.Module, example_input: torch.Tensor, *, weights_only: bool = False, metadata: dict | None = None
) -> onnx.ModelProto:
    """The ONNX model of `qmodel` (see the module docstring), traced on `example_input`, with the
    batch, height and width axes dynamic where the model allows; `metadata` (JSON values) goes
    into the model's metadata_props as `dsq.<key>`."""
    x = _float_input(example_input)
    qmodel = qmodel.eval()
    with export_layers(qmodel, weights_only) as layers, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's exporter warns about its own internals
        auto = torch.export.Dim.AUTO  # dynamic where the model allows it (batch, height, width), else fixed
        try:
            program = torch.onnx.export(
                qmodel,
                (x,),
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=({axis: auto for axis in (0, 2, 3) if axis < x.dim()},),
                custom_translation_table=TRANSLATIONS,
                verbose=False,
            )
        except Exception as error:  # torch's exporter raises many kinds; its last line says why
            raise DsqError(f"torch.onnx could not export the model: {_last_line(error)}") from None
        model = program.model_proto
        _finish(model, {name: m for name, m in layers})
    if metadata:
        helper.set_model_props(model, {METADATA_PREFIX + key: json.dumps(value) for key, value in metadata.items()})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise DsqError(f"export made an invalid ONNX graph ({_last_line(error)}); report this as a dsq bug") from None
    return model


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("<class")]
    return (causes[0] if causes else lines[-1] if lines else type(error).__name__)[:300]


def _finish(model: onnx.ModelProto, layers: dict[str, nn.Module]) -> None:
    """Turn torch's graph with the placeholder nodes into the standard one: blocked
    DequantizeLinear on INT4/INT8 codes and float16/float32 scales, dsq.BFP calls with the
    function attached."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes, dropped = [], set()
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == "BlockDequantize":
            nodes.extend(_dequantize_nodes(node, initializers, (producers, uses), layers, dropped))
        else:
            nodes.append(node)
    _replace_nodes(graph, [n for n in nodes if id(n) not in dropped], keep=set(initializers))
    used = {name for node in graph.node for name in node.input}
    _replace_initializers(graph, [t for t in initializers.values() if t.name in used])
    del graph.value_info[:]  # torch's types for the names changed here; optional, inferred again
    if any(node.domain == DOMAIN for node in graph.node):
        model.functions.extend(function_protos())
    else:
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], keep: set[str]) -> None:
    """`nodes` in place of the graph's, without what only makes the file larger: torch's trace of
    each node (source paths, stack traces), node names, and long names of intermediate values
    (numbered instead; the graph's inputs and outputs and the names in `keep` stay)."""
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    named = {v.name for v in (*graph.input, *graph.output)} | keep
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in kept for a in n.attribute):
        named |= {v for n in kept for v in (*n.input, *n.output)}  # subgraphs may name outer values: keep all
    short: dict[str, str] = {}

    def rename(value: str) -> str:
        if not value or value in named:
            return value
        return short.setdefault(value, f"t{len(short)}")

    for node in kept:
        del node.metadata_props[:]
        node.ClearField("doc_string")
        node.ClearField("name")
        node.input[:] = [rename(v) for v in node.input]
        node.output[:] = [rename(v) for v in node.output]
    del graph.node[:]
    graph.node.extend(kept)


def _replace_initializers(graph: onnx.GraphProto, tensors: list[onnx.TensorProto]) -> None:
    kept = [onnx.TensorProto.FromString(t.SerializeToString()) for t in tensors]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _constant(name: str, initializers: dict, graph_uses: tuple[dict, Counter], dropped: set) -> np.ndarray:
    """The value of `name`: an initializer, a Constant node's, or a Reshape of one by a constant
    shape. A node whose only consumer was the dequantization is dropped (it is folded)."""
    producers, uses = graph_uses
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type in ("Reshape", "Constant") and uses[name] == 1:
        dropped.add(id(node))
    if node is not None and node.op_type == "Reshape":
        data = _constant(node.input[0], initializers, graph_uses, dropped)
        return data.reshape(_constant(node.input[1], initializers, graph_uses, dropped))
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    raise DsqError(f"export: {name!r} feeds a dequantization but is not a constant; report this as a dsq bug")


def _dequantize_nodes(node, initializers, graph_uses, layers, dropped) -> list[onnx.NodeProto]:
    """The DequantizeLinear (and the Cast of float16 scales) for one placeholder node."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    name, bits = attributes["layer"].decode(), attributes["bits"]
    codes = _constant(node.input[0], initializers, graph_uses, dropped).astype(np.int8)
    scales = _constant(node.input[1], initializers, graph_uses, dropped).astype(np.float32)
    codes_tensor = _codes_tensor(f"{name}.vqk", codes, bits)
    initializers[codes_tensor.name] = codes_tensor
    kds_name, nodes = f"{name}.kds", []
    half = scales.astype(np.float16)
    if layers[name].weight_format.scale_dtype == "float16" and np.array_equal(half.astype(np.float32), scales):
        initializers[kds_name] = numpy_helper.from_array(half, kds_name)
        scales_name = kds_name + ".float32"
        nodes.append(helper.make_node("Cast", [kds_name], [scales_name], to=TensorProto.FLOAT))
    else:
        initializers[kds_name] = numpy_helper.from_array(scales, kds_name)
        scales_name = kds_name
    out = node.output[0]
    dequantize = helper.make_node(
        "DequantizeLinear", [codes_tensor.name, scales_name], [out], axis=1, block_size=attributes["block"]
    )
    return [*nodes, dequantize]


def _codes_tensor(name: str, codes: np.ndarray, bits: int) -> onnx.TensorProto:
    """The codes as an INT4 initializer (at most INT4_BITS bits; two to a byte) or an INT8 one."""
    if bits > INT4_BITS:
        return numpy_helper.from_array(codes, name)
    if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
        raise DsqError(f"export: {name} holds codes outside INT4; report this as a dsq bug")
    nibbles = np.append(codes.ravel(), np.zeros(codes.size % 2, np.int8)).astype(np.uint8) & 0xF
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)  # the first of a pair in the low half
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def save_onnx(model: onnx.ModelProto, path) -> None:
    """Write `model` to `path` atomically (one file: no external data)."""
    data = model.SerializeToString()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
