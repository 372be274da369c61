"""ONNX export (dsq.export / dsq.exporters.to_onnx): the graph of every layer kind, checked with
onnx.checker and run by onnxruntime against dsq's exact arithmetic; the plain-torch state_dict;
torch's own exporters on a quantized model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

import dsq
from dsq.config import LayerRule, QuantConfig
from dsq.exporters import dequantized_state_dict, load_onnx, require_onnx
from dsq.exporters.onnx_export import to_onnx
from dsq.formats import ActFormat, WeightFormat
from dsq.nn import is_dsconv, make_trainable, set_backend

import zoo


class SamePadConv(nn.Conv2d):
    """A conv subclass with its own forward: TF's 'same' padding, as EfficientNet-Lite pads."""

    def forward(self, x):
        pad_h = max((-(-x.shape[-2] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - x.shape[-1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EveryKind(nn.Module):
    """One layer of each kind and layout: a padding subclass on the image, channel blocks (ragged
    at 32: 40 = 32 + 8), depthwise and grouped (flat blocks), pointwise, and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 24, 3, stride=2, bias=False)
        self.conv = nn.Conv2d(24, 40, 3, padding=1)
        self.depthwise = nn.Conv2d(40, 40, 3, padding=1, groups=40)
        self.grouped = nn.Conv2d(40, 40, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(40, 48, 1, bias=False)
        self.bn = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        x = F.relu(self.grouped(F.relu(self.depthwise(x)))) + x
        return self.fc(F.relu(self.bn(self.pointwise(x))).mean((2, 3)))


BITS = {"stem": 4, "conv": 2, "depthwise": 8, "grouped": 3, "pointwise": 6, "fc": 5}


def every_kind(scale_dtype: str) -> nn.Module:
    """EveryKind quantized with each layer at its BITS, the linear layer included, and the
    pointwise layer's input at its own BFP format (as the activation search sets them)."""
    torch.manual_seed(0)
    model = zoo.calibrate_bn(EveryKind(), torch.randn(16, 3, 20, 20)).eval()
    rules = tuple(LayerRule(name=name, bits=bits) for name, bits in BITS.items())
    config = QuantConfig(WeightFormat(bits=4, block=32, scale_dtype=scale_dtype), rules=rules)
    qmodel, _ = dsq.quantize(model, config, progress=False)
    qmodel.pointwise.act_format = ActFormat(5, 8)
    return qmodel


def images(batch: int = 3, side: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def exact(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """dsq's exactly rounded outputs (the backend the int kernel equals bit for bit)."""
    set_backend(qmodel, "exact")
    try:
        with torch.inference_mode():
            return qmodel(x)
    finally:
        set_backend(qmodel, "simulate")


def run(model: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def relative_error(got: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def attribute(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.fixture(scope="module", params=["float16", "float32"])
def exported(request):
    qmodel = every_kind(request.param)
    return request.param, qmodel, to_onnx(qmodel, images())


def test_every_kind_exports_a_valid_graph(exported):
    _, _, model = exported
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import} == {"": 21, "dsq": 1}
    assert [f.name for f in model.functions] == ["BlockStep", "RoundToStep", "BFP", "BFPRagged"]


def test_weights_are_blocked_dequantize_of_stored_codes(exported):
    """One DequantizeLinear per layer: INT4 codes at 2-4 bits and INT8 above, equal to VQK (flat
    layouts as (O, I*kh*kw)), block_size the layout's width, scales in the recipe's dtype."""
    scale_dtype, qmodel, model = exported
    tensors = initializers(model)
    dequantize = {n.input[0].removesuffix(".vqk"): n for n in nodes(model, "DequantizeLinear")}
    layers = {name: m for name, m in qmodel.named_modules() if is_dsconv(m)}
    assert set(dequantize) == set(layers) == set(BITS)
    for name, layer in layers.items():
        node = dequantize[name]
        codes = tensors[node.input[0]]
        assert codes.data_type == (TensorProto.INT4 if BITS[name] <= 4 else TensorProto.INT8), name
        assert np.array_equal(numpy_helper.to_array(codes).ravel(), layer.vqk.numpy().ravel()), name
        assert attribute(node, "axis") == 1 and attribute(node, "block_size") == layer.layout.width, name
        kds = tensors[f"{name}.kds"]
        assert kds.data_type == (TensorProto.FLOAT16 if scale_dtype == "float16" else TensorProto.FLOAT), name
        assert np.array_equal(numpy_helper.to_array(kds).astype(np.float32).ravel(), layer.kds.numpy().ravel()), name
    assert len(nodes(model, "Cast")) >= (len(layers) if scale_dtype == "float16" else 0)


def test_one_bfp_call_per_quantized_input_with_the_layer_format(exported):
    """The image input stays float; every other layer's BFP format is its call's attributes."""
    _, qmodel, model = exported
    calls = [n for n in model.graph.node if n.domain == "dsq"]
    formats = sorted((m.act_format.bits, m.act_format.block) for m in qmodel.modules() if is_dsconv(m) and m.act_format)
    assert sorted((attribute(n, "bits"), attribute(n, "block")) for n in calls) == formats
    assert (5, 8) in formats and len(calls) == len(BITS) - 1


def test_onnxruntime_computes_what_dsq_computes(exported):
    """onnxruntime's outputs equal dsq's exactly rounded ones up to float32 summation order, at
    any batch size (the batch axis is dynamic) and another image size."""
    _, qmodel, model = exported
    for x in (images(), images(batch=1, seed=1), images(batch=5, side=28, seed=2)):
        (got,) = run(model, x)
        assert relative_error(got, exact(qmodel, x)) < 1e-5


def test_weights_only_leaves_activations_float(exported):
    _, qmodel, _ = exported
    model = to_onnx(qmodel, images(), weights_only=True)
    assert not [n for n in model.graph.node if n.domain == "dsq"] and not model.functions
    assert {o.domain for o in model.opset_import} == {""}
    formats = {name: m.act_format for name, m in qmodel.named_modules() if is_dsconv(m)}
    try:
        for name, m in qmodel.named_modules():
            if is_dsconv(m):
                m.act_format = None
        (got,) = run(model, images())
        assert relative_error(got, exact(qmodel, images())) < 1e-5
    finally:
        for name, m in qmodel.named_modules():
            if is_dsconv(m):
                m.act_format = formats[name]


def test_export_leaves_the_model_as_it_was(exported):
    _, qmodel, _ = exported
    before = qmodel(images())
    to_onnx(qmodel, images())
    assert all(type(m).__name__.startswith("DS") for m in qmodel.modules() if is_dsconv(m))
    assert torch.equal(qmodel(images()), before)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0", "tiny_yolo"])
def test_zoo_models_export_and_run(name, tmp_path):
    """Each zoo model (squeeze-excite and hardswish, TF 'same' padding, a multi-output detection
    head with grouped convs) at W4: a valid file no more than 5 % larger than its .dsq file, whose
    outputs in onnxruntime equal dsq's."""
    _, qmodel, report = zoo.quantized(name)
    x = zoo.example_input(name)
    path = tmp_path / f"{name}.onnx"
    dsq.export(qmodel, path, x)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    dsq.save(tmp_path / f"{name}.dsq", qmodel, report)
    assert path.stat().st_size <= 1.05 * (tmp_path / f"{name}.dsq").stat().st_size
    expected = exact(qmodel, x)
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    got = run(model, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert relative_error(a, b) < 1e-3, name


def test_export_refuses_what_it_cannot_export(one_line_dsq_error):
    qmodel = every_kind("float16")
    for call, words in [
        (lambda: to_onnx(EveryKind(), images()), ["no DSConv layers"]),
        (lambda: to_onnx(qmodel, None), ["example input"]),
        (lambda: to_onnx(qmodel, images().double()), ["float32"]),
        (lambda: dsq.export(qmodel, "model.tflite"), [".onnx or .pth"]),
        (lambda: dsq.export(qmodel, "model.onnx", images(), format="tflite"), ["unknown export format"]),
    ]:
        message = one_line_dsq_error(call)
        assert all(word in message for word in words), message
    make_trainable(qmodel)
    assert "freeze" in one_line_dsq_error(to_onnx, qmodel, images())


def test_missing_onnx_packages_say_how_to_install(monkeypatch, one_line_dsq_error):
    import dsq.exporters as exporters

    real = exporters.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(exporters, "import_module", without_onnxruntime)
    message = one_line_dsq_error(require_onnx)
    assert "onnxruntime" in message and "pip install 'dsq[onnx]'" in message


@pytest.mark.parametrize("content", [b"", b"not an onnx file", b"\x08\x07" * 100])
def test_a_broken_onnx_file_is_one_line(tmp_path, content, one_line_dsq_error):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    assert str(path) in one_line_dsq_error(load_onnx, path)


def test_metadata_travels_in_the_file(tmp_path):
    qmodel = every_kind("float16")
    path = tmp_path / "model.onnx"
    dsq.export(qmodel, path, images(), metadata={"num_classes": 10, "preset": {"name": "x", "crop": 20}})
    model = load_onnx(path)
    assert model.metadata == {"num_classes": 10, "preset": {"name": "x", "crop": 20}}
    assert model(images()).shape == (3, 10)


# ---- a plain torch state_dict -------------------------------------------------------------------


def test_state_dict_loads_into_the_float_model_without_dsq(tmp_path):
    """The .pth holds the float model's keys, loads with weights_only=True, and the float model
    then computes what the quantized one computes with float inputs."""
    qmodel = every_kind("float16")
    path = tmp_path / "model.pth"
    dsq.export(qmodel, path)
    state = torch.load(path, weights_only=True)
    float_model = EveryKind().eval()
    assert list(state) == list(float_model.state_dict())
    float_model.load_state_dict(state)
    for name, m in qmodel.named_modules():
        if is_dsconv(m):
            m.act_format = None
    assert torch.allclose(float_model(images()), qmodel(images()), rtol=0, atol=1e-6)
    assert torch.equal(state["conv.weight"], dequantized_state_dict(qmodel)["conv.weight"])


# ---- torch's own exporters ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    _, qmodel, _ = zoo.quantized("cifar_resnet20")
    return qmodel, zoo.example_input("cifar_resnet20")


def test_torch_export_traces_a_quantized_model(simulated):
    """torch.export works (no data pointers of fake tensors are read) and its program holds the
    dequantization and the BFP rounding, not a float copy of the weights."""
    qmodel, x = simulated
    program = torch.export.export(qmodel, (x,))
    assert torch.equal(program.module()(x), qmodel(x))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("frexp" in t for t in targets)
    layers = [name for name, m in qmodel.named_modules() if is_dsconv(m)]
    assert all(f"{name}.vqk" in program.state_dict and f"{name}.weight" not in program.state_dict for name in layers)


def test_torch_onnx_exports_a_quantized_model(simulated):
    """Both of torch's ONNX exporters (dynamo and TorchScript) translate the BFP rounding."""
    qmodel, x = simulated
    expected = exact(qmodel, x)
    program = torch.onnx.export(qmodel, (x,), dynamo=True, verbose=False)
    (got,) = run(program.model_proto, x)
    assert relative_error(got, expected) < 1e-2
    buffer = io.BytesIO()
    torch.onnx.export(qmodel, (x,), buffer, dynamo=False, opset_version=17)
    (got,) = run(onnx.load_from_string(buffer.getvalue()), x)
    assert relative_error(got, expected) < 1e-2


def test_torchscript_of_a_quantized_model_is_smaller_than_float(simulated):
    """A trace holds VQK and KDS and the dequantization, not a float copy of every weight."""
    qmodel, x = simulated
    sizes = {}
    for name, model in (("quantized", qmodel), ("float", zoo.build("cifar_resnet20"))):
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(model, x, check_trace=False), buffer)
        sizes[name] = len(buffer.getvalue())
    assert sizes["quantized"] < 0.6 * sizes["float"]
