"""BatchNorm folded into a DSConv layer: one multiply per output channel on the KDS, VQK unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

import dsq
from dsq.errors import DsqError
from dsq.nn import make_trainable


def conv_and_bn(groups: int, scale_dtype: str = "float16"):
    """A quantized conv (48 inputs: a ragged channel block, or flat depthwise blocks) and an
    eval-mode BatchNorm with made-up statistics, negative gammas included."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=groups, bias=False))
    qconv = dsq.quantize(conv, bits=4, scale_dtype=scale_dtype, quantize_image_input=True, depthwise_bits=4)[0][0]
    bn = nn.BatchNorm2d(48).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 4)
        bn.weight.normal_()
        bn.bias.normal_()
    return qconv, bn


@pytest.mark.parametrize("groups", [1, 48], ids=["channel-ragged", "depthwise-flat"])
def test_fold_matches_conv_then_batchnorm(groups):
    """Each scale is re-rounded to float16 (relative error <= 2^-11, float16's unit roundoff), so each output
    moves by at most 2^-11 of the conv of |input| with |folded weight|, plus float32 rounding."""
    qconv, bn = conv_and_bn(groups)
    x = torch.randn(2, 48, 9, 9)
    with torch.no_grad():
        want = bn(qconv(x))
    folded = copy.deepcopy(qconv)
    folded.fold_batchnorm(bn)
    assert torch.equal(folded.vqk, qconv.vqk)
    with torch.no_grad():
        got = folded(x)
        magnitude = F.conv2d(folded.quantize_input(x).abs(), folded.weight.abs(), None, 1, 1, 1, groups)
    assert ((got - want).abs() <= 2**-11 * magnitude + 1e-6 * want.abs().max()).all()
    assert torch.equal(folded.kds, folded.kds.half().float())  # still float16 values: the file keeps them


def test_float32_scales_fold_to_float_rounding():
    qconv, bn = conv_and_bn(1, scale_dtype="float32")
    x = torch.randn(2, 48, 9, 9)
    with torch.no_grad():
        want = bn(qconv(x))
        qconv.fold_batchnorm(bn)
        assert torch.allclose(qconv(x), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_torch_fuse_conv_bn_eval_takes_the_same_fold():
    """torch's own fuse assigns `conv.weight`: a DSConv takes it as the same per-channel rescale."""
    qconv, bn = conv_and_bn(1)
    ours = copy.deepcopy(qconv)
    ours.fold_batchnorm(bn)
    theirs = fuse_conv_bn_eval(qconv, bn)
    assert torch.equal(theirs.vqk, ours.vqk)
    assert torch.equal(theirs.kds, ours.kds)
    assert torch.allclose(theirs.bias, ours.bias, rtol=1e-6, atol=1e-6)


def test_other_new_weights_are_refused():
    qconv, _ = conv_and_bn(1)
    with pytest.raises(DsqError, match="rescale of each output channel"):
        qconv.weight = nn.Parameter(torch.randn_like(qconv.weight))
    with pytest.raises(DsqError, match="rescale of each output channel"):
        qconv.weight = nn.Parameter(torch.randn(3, 3))


def test_trainable_layer_keeps_its_codes():
    """A trainable ("ste") layer scales its latent weight along: the same codes, unrounded scales."""
    qconv, bn = conv_and_bn(1)
    make_trainable(nn.Sequential(qconv), weights="ste")
    x = torch.randn(2, 48, 9, 9)
    with torch.no_grad():
        want = bn(qconv(x))
        qconv.fold_batchnorm(bn)
        assert torch.allclose(qconv(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
