"""dsq.quantize on a small zoo: surgery, the report, size accounting, settings."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsq
import dsq.models
from dsq.nn import DSConv2d, DSLinear, is_dsconv

from zoo import (
    ZOO,
    RefBFP,
    build,
    convs,
    example_input,
    linears,
    pristine_state,
    quantized,
    ref_bfp,
    ref_layout,
    ref_scale_shape,
)

BITS_LOW, BITS_HIGH = 4, 8
# The zoo runs store KDS scales as float16 (spec section 5: 4-bit, B = 32, float16 scales -> 4.5 bits)

SCALE_BITS = 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, list[str]]:
    """Output, each conv's (input, output), and the order in which the convs ran."""
    seen, order = {}, []

    def hook(mod, args, out, name):
        order.append(name)
        seen.setdefault(name, (args[0], out))

    hooks = [m.register_forward_hook(functools.partial(hook, name=n)) for n, m in convs(model)]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, seen, order


def _n_scales(shape, groups, block=32) -> int:
    kind = ref_layout(shape[1], block, groups)
    return math.prod(ref_scale_shape(tuple(shape) + (1,) * (4 - len(shape)), kind, block))


@functools.lru_cache(maxsize=None)
def zoo_run(name: str) -> dict:
    """Float model, its state before quantizing, and 4-bit / 8-bit conversions (cached per session)."""
    model = build(name)
    before = pristine_state(name)  # the state right after building, before any quantize
    x = example_input(name)
    y, float_io, order = _trace(model, x)
    # no refinement keeps the zoo fast; refinement is tested in tests/formats
    _, q_lo, r_lo = quantized(name, bits=BITS_LOW, rounds=0)
    _, q_hi, r_hi = quantized(name, bits=BITS_HIGH, rounds=0)
    y_hi, hi_io, _ = _trace(q_hi, x)
    with torch.no_grad():
        y_lo = q_lo(x)
    return dict(
        model=model,
        before=before,
        x=x,
        y=y,
        float_io=float_io,
        first=order[0],
        q_lo=q_lo,
        r_lo=r_lo,
        q_hi=q_hi,
        r_hi=r_hi,
        y_lo=y_lo,
        y_hi=y_hi,
        hi_io=hi_io,
    )


NAMES = list(ZOO)


@pytest.fixture(params=NAMES)
def run(request):
    return zoo_run(request.param)


def test_every_conv_converted_and_linears_kept(run):
    model, q = run["model"], run["q_lo"]
    float_convs, q_convs = convs(model), convs(q)
    assert len(float_convs) > 0
    assert [n for n, _ in q_convs] == [n for n, _ in float_convs]
    assert all(is_dsconv(m) for _, m in q_convs)
    assert sum(is_dsconv(m) for m in q.modules()) == len(float_convs)
    # the classes are kept (subclass forwards survive)
    for (_, f), (_, m) in zip(float_convs, q_convs):
        assert isinstance(m, type(f))
    assert all(type(m) is nn.Linear for _, m in linears(q))
    assert not q.training


def test_float_model_untouched(run):
    model = run["model"]
    after = model.state_dict()
    assert list(after) == list(run["before"])
    for k, v in run["before"].items():
        assert torch.equal(after[k], v), k
    assert not any(is_dsconv(m) for m in model.modules())
    assert all(isinstance(m.weight, nn.Parameter) for _, m in convs(model))


def test_outputs_finite_and_close(run):
    """Each quantized conv, fed the float network's own input at that layer, stays close to the
    float conv (8 bits tightly, 4 bits loosely); the whole network's output stays finite and
    closer at 8 bits. Whole-network bounds are loose on purpose: random-init BatchNorm networks
    amplify any perturbation layer after layer (their float output moves 10-30x more than their
    input does), so only the per-layer errors measure the quantization itself."""
    y, y_lo, y_hi = run["y"], run["y_lo"], run["y_hi"]
    assert torch.isfinite(y_lo).all() and torch.isfinite(y_hi).all()
    rel_lo, rel_hi = _rel(y_lo, y), _rel(y_hi, y)
    assert rel_hi < 0.6 and rel_lo < 2.0 and rel_hi < rel_lo, (rel_hi, rel_lo)
    worst_lo = worst_hi = 0.0
    for name, (inp, out) in run["float_io"].items():
        with torch.no_grad():
            lo = _rel(run["q_lo"].get_submodule(name)(inp), out)
            hi = _rel(run["q_hi"].get_submodule(name)(inp), out)
        worst_lo, worst_hi = max(worst_lo, lo), max(worst_hi, hi)
        assert hi < lo, name
    # 8-bit weights (~45 dB) and 8-bit BFP inputs (about 1 % per value): a few percent at most
    assert worst_hi < 0.05, worst_hi
    assert worst_lo < 0.4, worst_lo


def test_simulation_reference(run):
    """Inside the model, every converted conv computes the float conv with its dequantized weight
    on its input rounded by the reference BFP (all but the conv that reads the image)."""
    model, q = run["model"], run["q_hi"]
    seen = run["hi_io"]
    assert set(seen) == {n for n, _ in convs(model)}
    for name, conv in convs(model):
        inp, out = seen[name]
        ref = copy.deepcopy(conv)
        with torch.no_grad():
            ref.weight.copy_(q.get_submodule(name).weight)
            expected = ref(inp if name == run["first"] else ref_bfp(inp, 8, 32))
        scale = expected.abs().max().item()
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5 * scale), name


def test_report_rows(run):
    model, r_lo, r_hi, q_lo = run["model"], run["r_lo"], run["r_hi"], run["q_lo"]
    first = run["first"]
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [row.name for row in r_lo.layers] == [n for n, _ in modules]
    assert [row.name for row in r_hi.layers] == [n for n, _ in modules]
    qmods = dict(q_lo.named_modules())
    for (name, m), lo, hi in zip(modules, r_lo.layers, r_hi.layers):
        assert lo.shape == list(m.weight.shape) and lo.params == m.weight.numel()
        if isinstance(m, nn.Linear):
            assert lo.kind == "linear" and not lo.quantized and "linear" in lo.note
            assert lo.bits_per_weight == 32.0 and lo.packed_bytes == lo.float_bytes == 4 * lo.params
            continue
        kind = "conv" if m.groups == 1 else ("depthwise" if m.groups == m.in_channels else "grouped")
        assert lo.kind == kind and lo.groups == m.groups
        assert lo.quantized and hi.quantized and lo.note == ""
        assert (lo.bits, hi.bits, lo.block) == (BITS_LOW, BITS_HIGH, 32)
        assert lo.layout == hi.layout == ref_layout(m.weight.shape[1], 32, m.groups)
        n_scales = _n_scales(m.weight.shape, m.groups)
        assert lo.bits_per_weight == pytest.approx(BITS_LOW + SCALE_BITS * n_scales / lo.params, rel=1e-12)
        assert hi.bits_per_weight == pytest.approx(BITS_HIGH + SCALE_BITS * n_scales / lo.params, rel=1e-12)
        assert lo.float_bytes == 4 * lo.params
        assert lo.packed_bytes == math.ceil(lo.params * BITS_LOW / 8) + SCALE_BITS // 8 * n_scales
        # the model in memory holds the float16-rounded scales it will be saved with
        kds = qmods[name].kds
        assert kds.dtype == torch.float32 and torch.equal(kds.half().float(), kds)
        assert lo.act == ("float (image input)" if name == first else "bfp8/32")
        # SQNR of the weight, recomputed here
        w, wq = m.weight.detach().double(), qmods[name].weight.detach().double()
        sqnr = 10 * math.log10(w.pow(2).sum().item() / (w - wq).pow(2).sum().item())
        assert lo.sqnr_db == pytest.approx(sqnr, abs=1e-3)
        assert math.isfinite(lo.sqnr_db) and math.isfinite(hi.sqnr_db)
        assert hi.sqnr_db > lo.sqnr_db + 12, (name, lo.sqnr_db, hi.sqnr_db)  # ~6 dB per bit
        assert lo.sqnr_db > 14 and hi.sqnr_db > 38, name
        assert lo.rel_error == pytest.approx(10 ** (-lo.sqnr_db / 20), rel=1e-6)


def test_size_accounting(run):
    model, r = run["model"], run["r_lo"]
    state = model.state_dict()
    float_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert r.model_float_bytes == float_bytes
    packed = 0
    dropped = 0
    for name, m in convs(model):
        n_scales = _n_scales(m.weight.shape, m.groups)
        packed += math.ceil(m.weight.numel() * BITS_LOW / 8) + SCALE_BITS // 8 * n_scales
        dropped += m.weight.numel() * 4
    assert r.model_quantized_bytes == float_bytes - dropped + packed
    assert r.model_quantized_bytes < r.model_float_bytes
    assert r.compression == pytest.approx(float_bytes / (float_bytes - dropped + packed), rel=1e-12)
    q_params = sum(m.weight.numel() for _, m in convs(model))
    mean_bits = sum(
        (BITS_LOW * m.weight.numel() + SCALE_BITS * _n_scales(m.weight.shape, m.groups)) for _, m in convs(model)
    )
    assert r.mean_bits_per_weight == pytest.approx(mean_bits / q_params, rel=1e-12)
    json.dumps(r.to_dict())  # serialisable as is


def test_resnet18_compression():
    """ResNet-18, 4 bits, block 32, float16 scales, fc float: every conv but the stem has I a
    multiple of 32, so 4 + 16/32 = 4.5 bits per weight; the stem (I = 3, a plain conv) keeps
    channel blocks of 3: 4 + 16/3 bits per weight."""
    r = zoo_run("resnet18")["r_lo"]
    model = zoo_run("resnet18")["model"]
    stem = model.conv1.weight.numel()  # 64 * 3 * 7 * 7
    other = sum(m.weight.numel() for n, m in convs(model) if n != "conv1")
    assert other % 16 == 0
    rest = r.model_float_bytes - 4 * (stem + other)  # fc, biases, BatchNorm
    expected_q = rest + math.ceil(stem * 4 / 8) + 2 * (64 * 49) + other * 9 // 16
    assert r.model_quantized_bytes == expected_q
    assert r.compression == pytest.approx(r.model_float_bytes / expected_q)
    assert r.compression > 6
    stem_row = next(row for row in r.layers if row.name == "conv1")
    assert stem_row.layout == "channel" and stem_row.bits_per_weight == pytest.approx(4 + 16 / 3)
    assert all(row.bits_per_weight == 4.5 for row in r.quantized_layers if row.name != "conv1")


@pytest.mark.parametrize("scale_dtype,bits", [("float32", 32), ("float16", 16)])
def test_scale_dtype(scale_dtype, bits):
    model = resnet20()
    q, r = dsq.quantize(model, bits=4, rounds=0, scale_dtype=scale_dtype)
    for row in r.quantized_layers:
        m = model.get_submodule(row.name)
        n_scales = _n_scales(m.weight.shape, m.groups)
        assert row.bits_per_weight == pytest.approx(4 + bits * n_scales / row.params)
        assert row.packed_bytes == math.ceil(row.params * 4 / 8) + bits // 8 * n_scales
    if scale_dtype == "float32":  # unrounded: the plain L2 fit of the weight
        m = q.layer2[0].conv1
        from dsq.formats import quantize_weight

        expected = quantize_weight(model.layer2[0].conv1.weight, m.weight_format, 1)
        assert torch.equal(m.kds, expected.kds)


def test_bad_scale_dtype(one_line_dsq_error):
    one_line_dsq_error(dsq.quantize, resnet20(), scale_dtype="int8")


# --------------------------------------------------------------------------- settings (on ResNet-20)
def resnet20():
    return build("cifar_resnet20")


def _x20():
    return example_input("cifar_resnet20")


def test_quantize_linear():
    model = resnet20()
    q, r = dsq.quantize(model, bits=4, rounds=0, quantize_linear=True, scale_dtype="float16")
    assert isinstance(q.linear, DSLinear)
    row = r.layers[-1]
    assert row.name == "linear" and row.kind == "linear" and row.quantized and row.note == ""
    assert row.act == "bfp8/32" and row.layout == "channel"
    assert row.bits_per_weight == pytest.approx(4 + SCALE_BITS * 10 * 2 / 640)
    # the linear layer: F.linear on the BFP'd features with the dequantized weight
    feats = torch.randn(3, 64)
    with torch.no_grad():
        expected = F.linear(ref_bfp(feats, 8, 32, dim=-1), q.linear.weight, model.linear.bias)
        assert torch.allclose(q.linear(feats), expected, rtol=1e-5, atol=1e-6)
    q0, r0 = dsq.quantize(model, bits=4, rounds=0)
    assert type(q0.linear) is nn.Linear and torch.equal(q0.linear.weight, model.linear.weight)
    assert r.model_quantized_bytes < r0.model_quantized_bytes


def test_exclude_globs(one_line_dsq_error):
    model = resnet20()
    q, r = dsq.quantize(model, bits=4, rounds=0, exclude=("layer1.*", "*.2.conv2"))
    for row in r.layers:
        excluded = row.name.startswith("layer1.") or row.name.endswith(".2.conv2")
        module = q.get_submodule(row.name)
        if row.kind == "linear":
            continue
        if excluded:
            assert type(module) is nn.Conv2d and not row.quantized, row.name
            assert torch.equal(module.weight, model.get_submodule(row.name).weight)
            pattern = "layer1.*" if row.name.startswith("layer1.") else "*.2.conv2"
            assert f"'{pattern}'" in row.note and "exclude" in row.note
            assert row.bits_per_weight == 32.0 and row.packed_bytes == row.float_bytes
        else:
            assert isinstance(module, DSConv2d) and row.quantized, row.name
    n_excluded = sum(not row.quantized for row in r.layers if row.kind != "linear")
    assert n_excluded == 6 + 2  # layer1.{0,1,2}.conv{1,2}; layer2.2.conv2, layer3.2.conv2
    # excluding a layer keeps its float bytes
    q_all, r_all = dsq.quantize(model, bits=4, rounds=0)
    saved = sum(row.float_bytes - row.packed_bytes for row in r_all.layers if row.quantized and not row.note)
    lost = sum(
        row.float_bytes - row.packed_bytes
        for row in r_all.layers
        if row.name.startswith("layer1.") or row.name.endswith(".2.conv2")
    )
    assert r.model_quantized_bytes == r_all.model_float_bytes - saved + lost


def test_include_globs():
    model = resnet20()
    q, r = dsq.quantize(model, bits=4, rounds=0, include=("layer3.*", "conv1"), exclude=("layer3.0.*",))
    quantized = [row.name for row in r.layers if row.quantized]
    assert quantized == ["conv1"] + [f"layer3.{i}.conv{j}" for i in (1, 2) for j in (1, 2)]
    for row in r.layers:
        if row.name.startswith("layer1.") or row.name.startswith("layer2."):
            assert "include" in row.note and type(q.get_submodule(row.name)) is nn.Conv2d
        if row.name.startswith("layer3.0."):
            assert "'layer3.0.*'" in row.note


def test_image_input_not_bfp_by_default():
    model, x = resnet20(), _x20()
    q, r = dsq.quantize(model, bits=4, rounds=0)
    assert r.layers[0].name == "conv1" and r.layers[0].act == "float (image input)"
    assert q.conv1.act_format is None and q.layer1[0].conv1.act_format is not None
    with torch.no_grad():
        assert torch.allclose(q.conv1(x), F.conv2d(x, q.conv1.weight, None, 1, 1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(q.conv1(x), F.conv2d(ref_bfp(x, 8, 32), q.conv1.weight, None, 1, 1), atol=1e-6)
    qi, ri = dsq.quantize(model, bits=4, rounds=0, quantize_image_input=True)
    assert ri.layers[0].act == "bfp8/32" and qi.conv1.act_format == dsq.formats.ActFormat(8, 32)
    with torch.no_grad():
        expected = F.conv2d(ref_bfp(x, 8, 32), qi.conv1.weight, None, 1, 1)
        assert torch.allclose(qi.conv1(x), expected, rtol=1e-5, atol=1e-6)


def test_act_bits_none_means_float_inputs_everywhere():
    model, x = resnet20(), _x20()
    q, r = dsq.quantize(model, bits=4, rounds=0, act_bits=None, quantize_linear=True)
    assert r.act_format is None
    assert all(m.act_format is None for m in q.modules() if is_dsconv(m))
    assert all(row.act.startswith("float") for row in r.layers)
    # exactly the float network with the dequantized weights
    ref = copy.deepcopy(model)
    for name, m in ref.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(q.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.allclose(q(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_bits,act_block,label", [(4, 16, "bfp4/16"), (6, 7, "bfp6/7")])
def test_act_format_settings(act_bits, act_block, label):
    model, x = resnet20(), _x20()
    q, r = dsq.quantize(model, bits=4, block=32, rounds=0, act_bits=act_bits, act_block=act_block)
    assert [row.act for row in r.layers[1:-1]] == [label] * (len(r.layers) - 2)
    bits, block = (int(v) for v in label[3:].split("/"))
    ref = copy.deepcopy(model)
    for name, m in convs(ref):
        with torch.no_grad():
            m.weight.copy_(q.get_submodule(name).weight)
        if name != "conv1":
            m.register_forward_pre_hook(RefBFP(bits, block))
    with torch.no_grad():
        expected = ref(x)
        # the same numbers up to float summation order (which can flip a rare BFP rounding)
        assert torch.allclose(q(x), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_settings_recorded_and_formats():
    q, r = dsq.quantize(
        resnet20(),
        bits=3,
        block=16,
        method="kl",
        layout="flat",
        act_bits=6,
        act_block=8,
        include=("layer3.*",),
        exclude=("linear",),
    )
    assert r.weight_format == dsq.formats.WeightFormat(
        bits=3, block=16, method="kl", layout="flat", scale_dtype="float16"
    )
    assert r.act_format == dsq.formats.ActFormat(6, 8)
    s = r.to_dict()["settings"]
    assert s["weight"]["bits"] == 3 and s["weight"]["block"] == 16 and s["weight"]["method"] == "kl"
    assert (
        s["act"] == {"bits": 6, "block": 8}
        and {"name": "linear", "kind": None, "bits": None, "keep_float": True} in s["rules"]
    )
    assert s["include"] == ["layer3.*"] and dsq.config.QuantConfig.from_dict(s) == r.config
    assert len(r.quantized_layers) == 6
    assert all(row.layout == "flat" for row in r.quantized_layers)
    assert all(math.isfinite(row.sqnr_db) for row in r.quantized_layers)
    with torch.no_grad():
        assert torch.isfinite(q(_x20())).all()


def test_model_in_training_mode_is_left_so():
    model = dsq.models.build_model("cifar_resnet20").train()
    q, _ = dsq.quantize(model, bits=4, rounds=0)
    assert model.training and not q.training


def test_bare_conv():
    conv = nn.Conv2d(40, 8, 3)
    q, r = dsq.quantize(conv, bits=4, rounds=0)
    assert isinstance(q, DSConv2d) and type(conv) is nn.Conv2d
    assert len(r.layers) == 1 and r.layers[0].quantized


BAD = [
    dict(bits=1),
    dict(bits=9),
    dict(bits=2.5),
    dict(bits=True),
    dict(block=0),
    dict(block=-1),
    dict(method="l1"),
    dict(rounds=-1),
    dict(layout="rows"),
    dict(act_bits=1),
    dict(act_bits=9),
    dict(act_block=-1),
    dict(act_bits=8.0),
]


class TiedLayers(nn.Module):
    """Two convs holding one weight, a conv kept float, a linear layer and a quantized conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.kept = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.kept(self.b(self.a(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_the_copy_shares_no_tensor_with_the_float_model():
    """The working copy shares the float weights that quantization replaces until it drops them:
    afterwards no tensor of the quantized model is one of the float model's, and layers kept float
    own their weights."""
    torch.manual_seed(0)
    model = TiedLayers()
    before = copy.deepcopy(model.state_dict())
    q, _ = dsq.quantize(model, bits=4, exclude=("kept",))
    storages = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in storages for t in itertools.chain(q.parameters(), q.buffers()))
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert is_dsconv(q.a) and is_dsconv(q.b) and torch.equal(q.a.vqk, q.b.vqk)
    assert not is_dsconv(q.kept) and type(q.fc) is nn.Linear


@pytest.mark.parametrize("kwargs", BAD, ids=[str(k) for k in BAD])
def test_bad_settings(kwargs, one_line_dsq_error):
    model = resnet20()
    one_line_dsq_error(dsq.quantize, model, **kwargs)


def test_act_block_zero_rejected(one_line_dsq_error):
    one_line_dsq_error(dsq.quantize, resnet20(), rounds=0, act_block=0)


@pytest.mark.parametrize("kwargs", [{"include": "layer3*"}, {"exclude": "layer1*"}], ids=["include", "exclude"])
def test_glob_given_as_string(kwargs):
    model = resnet20()
    try:
        _, r = dsq.quantize(model, bits=4, rounds=0, **kwargs)
    except dsq.DsqError:
        return
    for row in r.layers:
        if row.kind == "linear":
            continue
        if "include" in kwargs:
            assert row.quantized == row.name.startswith("layer3"), row.name
        else:
            assert row.quantized == (not row.name.startswith("layer1")), row.name


class StemRegisteredLast(nn.Module):
    """A head defined before the stem in __init__: registration order is not execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 4, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


def test_image_conv_is_the_one_that_reads_the_image():
    _, r = dsq.quantize(StemRegisteredLast(), bits=4, rounds=0)
    acts = {row.name: row.act for row in r.layers}
    assert acts == {"head": "bfp8/32", "stem": "float (image input)"}


def test_float64_model():
    model = dsq.models.build_model("cifar_resnet20").double()
    q, _ = dsq.quantize(model, bits=4, rounds=0)
    x = _x20().double()
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
