"""route_calls: each layer's actual kernel call, in execution order, and its unfolded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsq
from dsq.calibration.capture import route_calls
from dsq.nn import is_dsconv

import zoo


class SamePadConv(nn.Conv2d):
    """Pads TF-style in its forward, then calls F.conv2d without padding (as EfficientNet-Lite does)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


LAYERS = {
    "strided": nn.Conv2d(8, 6, 3, stride=2, padding=1),
    "dilated": nn.Conv2d(8, 4, 3, dilation=2, padding=2, bias=False),
    "grouped": nn.Conv2d(8, 4, 3, groups=2, padding=1),
    "depthwise": nn.Conv2d(8, 8, 3, groups=8, padding="same"),
    "tf same": SamePadConv(8, 6, 3, stride=2),
    "pointwise": nn.Conv2d(8, 6, 1),
    "pointwise strided grouped": nn.Conv2d(8, 6, 1, stride=2, groups=2),
    "pointwise padded": nn.Conv2d(8, 6, 1, padding=1),
    "linear": nn.Linear(8, 5),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_patches_times_weight_rows_is_the_layer_output(name):
    torch.manual_seed(0)
    layer = LAYERS[name]
    x = torch.randn(2, 8) if name == "linear" else torch.randn(2, 8, 9, 9)
    seen = []

    def handler(call):
        seen.append(call)
        return call.run()

    with torch.no_grad(), route_calls(layer, handler, {"layer": layer}):
        out = layer(x)
    (call,) = seen
    patches = call.patches()  # (G, D, M)
    groups = patches.shape[0]
    w = layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)
    rebuilt = w @ patches  # (G, O/G, M)
    if name == "linear":
        expected = (out - layer.bias).T[None]
    else:
        n, o, h, wd = out.shape
        bias = 0 if layer.bias is None else layer.bias[:, None, None]
        expected = (out - bias).reshape(n, groups, o // groups, h * wd).permute(1, 2, 0, 3).flatten(2)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-4, atol=1e-5)


def test_layers_are_seen_in_execution_order_with_their_bfp_input():
    model = zoo.build("tiny_yolo")
    qmodel, _ = dsq.quantize(model)
    layers = {n: m for n, m in qmodel.named_modules() if is_dsconv(m)}
    order, inputs_on_grid = [], []

    def handler(call):
        order.append(call.name)
        if call.layer.act_format is not None:  # the kernel gets the BFP-rounded input
            from dsq.formats import bfp_quantize

            inputs_on_grid.append(torch.equal(bfp_quantize(call.input, call.layer.act_format), call.input))
        return call.run()

    hooked = []
    for name, m in layers.items():
        hooked.append(m.register_forward_pre_hook(lambda mod, args, name=name: hooked_order.append(name)))
    hooked_order: list[str] = []
    with torch.no_grad(), route_calls(qmodel, handler, layers):
        qmodel(zoo.example_input("tiny_yolo"))
    for h in hooked:
        h.remove()
    assert order == hooked_order and sorted(order) == sorted(layers)
    assert inputs_on_grid and all(inputs_on_grid)
