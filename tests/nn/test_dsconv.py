"""DSConv layers against F.conv2d / F.linear on the BFP'd input and the dequantized weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsq.formats import ActFormat, WeightFormat, quantize_weight
from dsq.nn import DSConv2d, DSConvMixin, DSLinear, dsconv_class, is_dsconv, layer_kind, to_dsconv

from zoo import ref_bfp, ref_dequantize, ref_layout, ref_scale_shape

WF = WeightFormat(bits=4, block=32)
AF = ActFormat(bits=8, block=32)


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conv(*args, seed=0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(*args, **kwargs)
    if conv.bias is not None:
        nn.init.normal_(conv.bias)  # make the bias visible in the output
    return conv


def _deq(module) -> torch.Tensor:
    """The dequantized weight, by explicit indexing of the stored VQK and KDS."""
    groups = getattr(module, "groups", 1)
    kind = (
        ref_layout(module.vqk.shape[1], module.weight_format.block, groups)
        if module.weight_format.layout == "auto"
        else module.weight_format.layout
    )
    return ref_dequantize(module.vqk, module.kds, kind, module.weight_format.block).float()


def _reference_conv(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, act: ActFormat | None) -> torch.Tensor:
    """F.conv2d on the BFP'd input, padding done explicitly for every mode."""
    if act is not None:
        x = ref_bfp(x, act.bits, act.block)
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        pads = []
        for d, k in zip(reversed(conv.dilation), (kw, kh)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = conv.padding
        pads = [pw, pw, ph, ph]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return F.conv2d(x, w, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


CONV_CASES = {
    "plain3x3": dict(args=(40, 16, 3), kwargs=dict(padding=1)),
    "stride2": dict(args=(40, 16, 3), kwargs=dict(stride=2, padding=1)),
    "stride_hw": dict(args=(24, 8, (3, 5)), kwargs=dict(stride=(2, 1), padding=(1, 2))),
    "no_padding": dict(args=(33, 8, 3), kwargs=dict()),
    "reflect": dict(args=(40, 16, 3), kwargs=dict(padding=1, padding_mode="reflect")),
    "replicate": dict(args=(40, 16, 3), kwargs=dict(padding=2, padding_mode="replicate")),
    "circular": dict(args=(40, 16, 3), kwargs=dict(padding=1, padding_mode="circular")),
    "same": dict(args=(40, 16, 3), kwargs=dict(padding="same")),
    "same_even_kernel_dilated": dict(args=(40, 16, 4), kwargs=dict(padding="same", dilation=2)),
    "same_reflect": dict(args=(20, 8, 3), kwargs=dict(padding="same", padding_mode="reflect")),
    "dilation": dict(args=(40, 16, 3), kwargs=dict(padding=2, dilation=2)),
    "grouped": dict(args=(40, 16, 3), kwargs=dict(padding=1, groups=4)),
    "grouped_wide": dict(args=(128, 16, 3), kwargs=dict(padding=1, groups=2)),
    "depthwise": dict(args=(40, 40, 3), kwargs=dict(padding=1, groups=40)),
    "depthwise_mult2": dict(args=(16, 32, 5), kwargs=dict(stride=2, padding=2, groups=16)),
    "pointwise": dict(args=(96, 24, 1), kwargs=dict()),
    "stem": dict(args=(3, 16, 7), kwargs=dict(stride=2, padding=3)),
    "no_bias": dict(args=(40, 16, 3), kwargs=dict(padding=1, bias=False)),
}


ACT_VARIANTS = {"bfp8_32": AF, "bfp4_16": ActFormat(bits=4, block=16), "float": None}
FORWARD_CASES = [(case, "bfp8_32") for case in CONV_CASES] + [
    (case, act)
    for case in ("plain3x3", "reflect", "same", "grouped", "depthwise", "stem", "no_bias")
    for act in ("bfp4_16", "float")
]


@pytest.mark.parametrize("case,act_name", FORWARD_CASES)
def test_conv_forward_matches_reference(case, act_name):
    act = ACT_VARIANTS[act_name]
    spec = CONV_CASES[case]
    conv = _conv(*spec["args"], **spec["kwargs"])
    original = copy.deepcopy(conv)
    q = to_dsconv(conv, WF, act)
    assert q is conv and isinstance(q, DSConv2d) and isinstance(q, nn.Conv2d)
    x = _input(2, spec["args"][0], 9, 10, seed=1)
    w = _deq(q)
    # the stored integers are the format's quantization of the original weight
    qw = quantize_weight(original.weight, WF, original.groups)
    assert torch.equal(q.vqk, qw.vqk) and torch.equal(q.kds, qw.kds)
    assert torch.allclose(q.weight, w, rtol=1e-6, atol=1e-7)
    expected = _reference_conv(original, x, w, act)
    with torch.no_grad():
        got = q(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
    if act is None:  # no BFP: exactly the float conv with the dequantized weight
        float_conv = copy.deepcopy(original)
        float_conv.weight.data.copy_(w)
        assert torch.allclose(got, float_conv(x), rtol=1e-5, atol=1e-5)
    # quantization really happened: 4-bit weights differ from the float ones
    assert not torch.allclose(w, original.weight)


def test_buffers_and_parameters():
    conv = to_dsconv(_conv(40, 16, 3, padding=1), WF, AF)
    sd = conv.state_dict()
    assert set(sd) == {"vqk", "kds", "bias"}
    assert [n for n, _ in conv.named_parameters()] == ["bias"]
    assert sd["vqk"].dtype == torch.int8 and sd["vqk"].shape == (16, 40, 3, 3)
    assert sd["kds"].dtype == torch.float32 and tuple(sd["kds"].shape) == ref_scale_shape((16, 40, 3, 3), "channel", 32)
    assert int(sd["vqk"].min()) >= -8 and int(sd["vqk"].max()) <= 7
    dw = to_dsconv(_conv(40, 40, 3, padding=1, groups=40, bias=False), WF, AF)
    assert set(dw.state_dict()) == {"vqk", "kds"}
    assert list(dw.parameters()) == []
    assert dw.vqk.shape == (40, 1, 3, 3) and tuple(dw.kds.shape) == (40, 1)  # 9 weights per flat slice


@pytest.mark.parametrize("groups,kind", [(1, "channel"), (40, "flat")])
def test_repr_shows_format(groups, kind):
    conv = to_dsconv(_conv(40, 40, 3, padding=1, groups=groups), WeightFormat(bits=3, block=16), AF)
    text = repr(conv)
    assert "bits=3" in text and "block=16" in text and f"layout={kind}" in text
    assert "bfp8/32" in text
    assert "act=float" in repr(to_dsconv(_conv(8, 8, 1), WF, None))


def test_layer_kind():
    assert layer_kind(nn.Conv2d(8, 8, 3)) == "conv"
    assert layer_kind(nn.Conv2d(8, 8, 3, groups=8)) == "depthwise"
    assert layer_kind(nn.Conv2d(8, 16, 3, groups=8)) == "depthwise"
    assert layer_kind(nn.Conv2d(8, 16, 3, groups=2)) == "grouped"
    assert layer_kind(nn.Conv2d(1, 8, 3)) == "conv"
    assert layer_kind(nn.Linear(4, 2)) == "linear"
    conv = to_dsconv(nn.Conv2d(8, 16, 3, groups=2), WF, AF)
    assert conv.kind == "grouped" and is_dsconv(conv) and not is_dsconv(nn.Conv2d(8, 8, 3))


# --------------------------------------------------------------------------- conv subclasses
class TFSameConv(nn.Conv2d):
    """TF-style 'SAME' padding computed in forward (as EfficientNet ports do), then F.conv2d."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        oh, ow = -(-ih // sh), -(-iw // sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("groups,stride", [(1, 2), (40, 1), (40, 2)])
def test_conv_subclass_keeps_its_forward(groups, stride):
    torch.manual_seed(3)
    conv = TFSameConv(40, 40, 3, stride=stride, groups=groups)
    original = copy.deepcopy(conv)
    q = to_dsconv(conv, WF, AF)
    assert isinstance(q, TFSameConv) and is_dsconv(q)
    assert type(q).__name__ == "DSTFSameConv"
    assert dsconv_class(TFSameConv) is type(q)  # cached
    x = _input(2, 40, 9, 8, seed=4)
    # the float subclass run on the BFP'd input with the dequantized weight
    reference = copy.deepcopy(original)
    reference.weight.data.copy_(_deq(q))
    with torch.no_grad():
        expected = reference(ref_bfp(x, AF.bits, AF.block))
        got = q(x)
    assert got.shape == (2, 40, -(-9 // stride), -(-8 // stride))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # and it differs from a plain conv without the asymmetric padding (the subclass forward ran)
    if stride == 2:
        plain = F.conv2d(ref_bfp(x, 8, 32), _deq(q), q.bias, stride, 1, 1, groups)
        assert plain.shape != got.shape or not torch.allclose(plain, got, atol=1e-3)


def test_efficientnet_static_same_padding_conv():
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    torch.manual_seed(5)
    conv = utils.Conv2dStaticSamePadding(32, 32, 3, stride=2, groups=32, image_size=16)
    original = copy.deepcopy(conv)
    q = to_dsconv(conv, WF, AF)
    reference = copy.deepcopy(original)
    reference.weight.data.copy_(_deq(q))
    x = _input(2, 32, 16, 16, seed=6)
    with torch.no_grad():
        assert torch.allclose(q(x), reference(ref_bfp(x, 8, 32)), rtol=1e-4, atol=1e-4)


def test_dsconv_class_rejects_non_conv():
    with pytest.raises(TypeError):
        dsconv_class(nn.ReLU)
    assert dsconv_class(nn.Conv2d) is DSConv2d and dsconv_class(nn.Linear) is DSLinear


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize("act", [AF, None], ids=["bfp8", "float"])
@pytest.mark.parametrize("shape", [(5, 70), (2, 3, 70)])
def test_dslinear_forward(shape, act):
    torch.manual_seed(7)
    lin = nn.Linear(70, 9)
    original = copy.deepcopy(lin)
    q = to_dsconv(lin, WF, act)
    assert isinstance(q, DSLinear) and q.kind == "linear"
    assert q.vqk.shape == (9, 70) and q.vqk.dtype == torch.int8
    assert q.kds.numel() == 9 * 3  # blocks of 32 along the 70 input features
    assert set(q.state_dict()) == {"vqk", "kds", "bias"}
    x = _input(*shape, seed=8)
    w = _deq(q)
    xin = ref_bfp(x, 8, 32, dim=-1) if act else x
    with torch.no_grad():
        got = q(x)
    assert torch.allclose(got, F.linear(xin, w, original.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(w, original.weight)


@pytest.mark.parametrize("cls, args", [(DSConv2d, (8, 4, 3)), (DSLinear, (8, 4))], ids=["DSConv2d", "DSLinear"])
def test_direct_construction(cls, args):
    module = cls(*args, weight_format=WF, act_format=AF)
    assert "weight" not in dict(module.named_parameters())
    assert module.vqk.dtype == torch.int8


# --------------------------------------------------------------------------- dequantized-weight cache
def _cached_conv():
    q = to_dsconv(_conv(40, 16, 3, padding=1), WF, AF)
    q.weight  # fill the cache
    return q


def test_cache_follows_in_place_kds_change():
    q = _cached_conv()
    x = _input(1, 40, 6, 6)
    with torch.no_grad():
        w0 = q.weight.clone()
        y0 = q(x)
        q.kds.mul_(2)
        assert torch.allclose(q.weight, 2 * w0)
        assert torch.allclose(q(x) - q.bias[:, None, None], 2 * (y0 - q.bias[:, None, None]), rtol=1e-4, atol=1e-4)


def test_cache_follows_in_place_vqk_change():
    q = _cached_conv()
    w0 = q.weight.clone()
    with torch.no_grad():
        q.vqk.neg_()
        assert torch.equal(q.weight, -w0)
        q.vqk[0].zero_()
        assert torch.all(q.weight[0] == 0)


def test_cache_follows_load_state_dict():
    a, b = _cached_conv(), to_dsconv(_conv(40, 16, 3, padding=1, seed=9), WF, AF)
    b.weight
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, a.weight)
    x = _input(1, 40, 5, 5)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("how", ["assign_buffer", "load_state_dict_assign"])
def test_cache_follows_replaced_buffers(how):
    q = _cached_conv()
    new_kds = torch.full_like(q.kds, 0.5)
    if how == "assign_buffer":
        q.kds = new_kds
    else:
        state = {k: v.clone() for k, v in q.state_dict().items()}
        state["kds"] = new_kds
        q.load_state_dict(state, assign=True)
    assert torch.equal(q.weight, 0.5 * q.vqk.float())


def test_weight_follows_dtype_change():
    q = _cached_conv()
    q.weight
    q.double()
    assert q.weight.dtype == torch.float64 and q.kds.dtype == torch.float64 and q.vqk.dtype == torch.int8
    x = _input(1, 40, 5, 5).double()
    with torch.no_grad():
        assert q(x).dtype == torch.float64


def test_kds_trainable_gradient():
    """Spec section 4 adapts the float KDS scales: gradients must reach them through `weight`."""
    q = to_dsconv(_conv(40, 16, 3, padding=1), WF, None)
    q.kds.requires_grad_(True)
    x = _input(2, 40, 6, 6)
    q(x).square().sum().backward()
    assert q.kds.grad is not None and q.kds.grad.shape == q.kds.shape
    # compare with autograd through the reference dequantization
    kds = q.kds.detach().clone().requires_grad_(True)
    w = q.vqk.float() * kds.repeat_interleave(32, dim=1)[:, :40]
    F.conv2d(x, w, q.bias.detach(), 1, 1).square().sum().backward()
    assert torch.allclose(q.kds.grad, kds.grad, rtol=1e-4, atol=1e-4)


def test_deepcopy_and_state_dict_round_trip():
    q = to_dsconv(TFSameConv(40, 16, 3, stride=2), WF, AF)
    clone = copy.deepcopy(q)
    x = _input(1, 40, 7, 7)
    with torch.no_grad():
        assert torch.equal(clone(x), q(x))
    assert type(clone) is type(q) and clone.layout == q.layout
    assert isinstance(clone, DSConvMixin)
