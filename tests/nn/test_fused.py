"""The fused integer network (dsq.nn.fuse_int) and the kernel's output epilogue (dsq.nn.epilogue).

Without a BatchNorm, fusing changes no rounding: the fused network equals the unfused exact one
bit for bit. With a folded BatchNorm the fused arithmetic rounds once instead of twice; its
reference is the exact backend running the same epilogue, which the int backend equals bit for
bit on every kernel path (each instruction set, the others forced off, and the eager path).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsq
from dsq.errors import DsqWarning
from dsq.formats import ActFormat, WeightFormat, bfp_quantize
from dsq.nn import fuse_int, int_kernel, set_backend, to_dsconv
from dsq.nn.epilogue import Epilogue

import zoo


@pytest.fixture(params=["amx", "vnni", "avx512bw", "eager"])
def path(request) -> str:
    """A kernel choice of set_backend/fuse_int: one instruction set's tiles (the others forced
    off) or the eager path."""
    if request.param != "eager" and request.param not in int_kernel.kernel_isas():
        pytest.skip(f"the CPU kernel's {request.param} tiles do not run here")
    return request.param


def activations(*shape, seed=0) -> torch.Tensor:
    """Random inputs whose magnitude changes by powers of two from position to position."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    return torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-6, 7, (n, 1, h, w), generator=g).float())


def infer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


class Residual(nn.Module):
    """conv -> relu -> conv, + the input, relu; and a ReLU6 head: fusable without any BatchNorm."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.head = nn.Conv2d(c, 24, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.relu(self.conv1(x))
        y = F.relu(x + self.conv2(y))
        return F.relu6(self.head(y))


def test_without_batchnorm_fusing_changes_nothing(path):
    """ReLU, residual add and ReLU6 fused into the kernel: the exact unfused network, bit for bit."""
    torch.manual_seed(0)
    qmodel, _ = dsq.quantize(Residual().eval(), bits=4, block=16)
    x = torch.randn(2, 3, 12, 10)
    fused = fuse_int(qmodel, kernel=path)
    assert fused.fusions == {"stem": "relu", "conv1": "relu", "conv2": "add+relu", "head": "clamp"}
    reference = copy.deepcopy(qmodel)
    set_backend(reference, "exact")
    assert torch.equal(infer(fused, x), infer(reference, x))
    assert torch.equal(infer(fuse_int(qmodel, kernel=path, channels_last=False), x), infer(reference, x))


ZOO_NAMES = ["resnet18", "mobilenet_v2", "cifar_resnet20", "efficientnet_lite0", "tiny_yolo"]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_fused_int_equals_fused_exact(name, path):
    """With BatchNorm folded: int (each path) equals the exact fused reference bit for bit."""
    qmodel, _ = dsq.quantize(zoo.build(name))
    x = torch.cat([zoo.example_input(name, seed=s) for s in range(2)])
    fused = fuse_int(qmodel, kernel=path)
    assert torch.equal(infer(fused, x), infer(fuse_int(qmodel, backend="exact"), x))
    assert "batchnorm" in "".join(fused.fusions.values())


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_each_fused_layer_is_its_unfused_layers(name):
    """Layer by layer, on the network's own activations: a fused layer against its DSConv layer
    simulated, then BatchNorm, residual and activation in float32 (within 1e-5 of the largest
    output). Whole networks are not compared with the simulation: a value within float rounding
    of a BFP rounding boundary takes another mantissa in the next layer, and runs drift apart
    (docs/integer-backend.md); the real-data test measures what that does to accuracy."""
    from dsq.nn.fused import FusedConv

    qmodel, _ = dsq.quantize(zoo.build(name))
    fused = fuse_int(qmodel)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args))
        for n, m in fused.named_modules()
        if isinstance(m, FusedConv)
    ]
    infer(fused, zoo.example_input(name))
    for h in hooks:
        h.remove()
    assert seen
    for layer_name, args in seen.items():
        m = fused.get_submodule(layer_name)
        simulated = copy.deepcopy(m.conv)
        set_backend(simulated, "simulate")
        with torch.inference_mode():
            expected = simulated(args[0])
            if m.scale is not None:
                expected = expected * m.scale.float().view(-1, 1, 1) + m.shift.float().view(-1, 1, 1)
            expected = (expected + args[1] if len(args) > 1 else expected).clamp(m.lo, m.hi)
            out = m(*args)
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5, layer_name


def test_what_each_zoo_model_fuses():
    """ResNets take BatchNorm, the residual add and ReLU; MobileNet V2 BatchNorm and ReLU6; the
    layers that feed two consumers (YOLO's SiLU blocks) or none of these take nothing."""
    fusions = {name: fuse_int(dsq.quantize(zoo.build(name))[0]).fusions for name in ["resnet18", "mobilenet_v2"]}
    assert fusions["resnet18"]["layer1.0.conv2"] == "batchnorm+add+relu"
    assert fusions["resnet18"]["layer2.0.downsample.0"] == "batchnorm"
    assert fusions["mobilenet_v2"]["features.1.conv.0.0"] == "batchnorm+clamp"
    assert fusions["mobilenet_v2"]["features.2.conv.2"] == "batchnorm"


class Unfusable(nn.Module):
    """Each conv output is used twice, added with a scale, or normalised by batch statistics."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16, track_running_stats=False)

    def forward(self, x):
        y = self.a(x)
        z = torch.add(self.b(F.relu(y)), y, alpha=2.0)
        return self.bn(self.c(z)) + y


def test_what_does_not_match_stays_unfused():
    torch.manual_seed(0)
    qmodel, _ = dsq.quantize(Unfusable().eval(), bits=4, block=16)
    assert fuse_int(qmodel).fusions == {}


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(y) if y.sum() > 0 else y


class Outer(nn.Module):
    """An untraceable module holding a traceable, fusable one."""

    def __init__(self):
        super().__init__()
        self.inner, self.branchy = Residual(), Branchy()

    def forward(self, x):
        y = self.inner(x)[:, :3]
        return self.branchy(y) if y.sum() > 0 else y


def test_an_untraceable_module_is_fused_child_by_child():
    """Neither Outer's nor Branchy's forward can be traced: their children are fused one by one
    (Residual as a whole), with a warning; what is left runs unfused, bit for bit as before."""
    torch.manual_seed(0)
    qmodel, _ = dsq.quantize(Outer().eval(), bits=4, block=16)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(DsqWarning, match=r"cannot trace 2 module\(s\) \(e.g. the model: .*\); their children"):
        fused = fuse_int(qmodel)
    expected = {"stem": "relu", "conv1": "relu", "conv2": "add+relu", "head": "clamp"}
    assert fused.fusions == {f"inner.{name}": what for name, what in expected.items()}
    reference = copy.deepcopy(qmodel)
    set_backend(reference, "exact")
    assert torch.equal(infer(fused, x), infer(reference, x))


def test_an_empty_batch_gives_an_empty_output(path):
    """A batch of no images through the unfused and the fused int network on each path, the fused
    exact one, and a linear layer: empty outputs of the right shape, as torch's own layers give."""
    torch.manual_seed(0)
    qmodel, _ = dsq.quantize(Residual().eval(), bits=4, block=16)
    empty = torch.randn(0, 3, 8, 8)
    unfused = copy.deepcopy(qmodel)
    set_backend(unfused, "int", kernel=path)
    for model in (unfused, fuse_int(qmodel, kernel=path), fuse_int(qmodel, backend="exact")):
        assert infer(model, empty).shape == (0, 24, 8, 8)
    linear = to_dsconv(nn.Linear(40, 24), WeightFormat(bits=4, block=16), ActFormat(8, 16))
    set_backend(linear, "int", kernel=path)
    assert infer(linear, torch.randn(0, 40)).shape == (0, 24)


def test_a_fused_layer_refuses_the_simulate_backend():
    torch.manual_seed(0)
    fused = fuse_int(dsq.quantize(Residual().eval(), bits=4, block=16)[0])
    set_backend(fused, "simulate")
    with pytest.raises(RuntimeError, match="fused networks .* run on those only"):
        infer(fused, torch.randn(1, 3, 8, 8))


EPILOGUE_CASES = {
    "batchnorm, residual, relu": dict(o=32, bn=True, residual=True, clamp=(0.0, math.inf)),
    "24 outputs (the kernel computes 32)": dict(o=24, bn=True, residual=True, clamp=(0.0, 6.0)),
    "residual only": dict(o=16, bn=False, residual=True, clamp=(-math.inf, math.inf)),
    "broadcast residual": dict(o=16, bn=True, residual="broadcast", clamp=(0.0, math.inf)),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", EPILOGUE_CASES.values(), ids=EPILOGUE_CASES.keys())
def test_the_kernel_epilogue_equals_its_reference(case, channels_last, path):
    """A layer with an output epilogue on each path against the same epilogue applied by the exact
    backend: equal bit for bit, in the input's memory format."""
    from dsq.nn.epilogue import output_epilogue

    torch.manual_seed(1)
    layer = to_dsconv(nn.Conv2d(40, case["o"], 3, padding=1), WeightFormat(bits=4, block=16), ActFormat(8, 16))
    g = torch.Generator().manual_seed(2)
    epilogue = Epilogue(
        torch.rand(case["o"], generator=g, dtype=torch.float64) + 0.5 if case["bn"] else None,
        torch.randn(case["o"], generator=g, dtype=torch.float64) if case["bn"] else None,
        *case["clamp"],
    )
    x = activations(2, 40, 7, 6)
    shape = (2, case["o"], 1, 6) if case["residual"] == "broadcast" else (2, case["o"], 7, 6)
    residual = torch.randn(*shape, generator=g) if case["residual"] else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    outputs = {}
    for backend in (path, "exact"):
        set_backend(layer, "exact" if backend == "exact" else "int", kernel="auto" if backend == "exact" else backend)
        with torch.inference_mode(), output_epilogue(layer, epilogue, residual):
            outputs[backend] = layer(x)
    assert torch.equal(outputs[path], outputs["exact"])
    assert outputs[path].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_fusing_for_the_simulate_backend_is_a_one_line_error(one_line_dsq_error):
    qmodel, _ = dsq.quantize(Residual().eval(), bits=4, block=16)
    assert "run on the int or exact backend, not 'simulate'" in one_line_dsq_error(fuse_int, qmodel, backend="simulate")


@pytest.mark.parametrize("kernel,here", [("vnni", ["avx512bw"]), ("amx", ["avx512bw", "vnni"])])
def test_forcing_a_kernel_this_cpu_lacks_is_a_one_line_error(kernel, here, monkeypatch, one_line_dsq_error):
    from dsq.nn import int_plan

    monkeypatch.setattr(int_plan, "kernel_isas", lambda: here)
    layer = to_dsconv(nn.Conv2d(16, 16, 1), WeightFormat(), ActFormat())
    message = one_line_dsq_error(set_backend, layer, "int", kernel=kernel)
    assert f"{kernel!r} does not run on this CPU (here: {', '.join(here)})" in message


def test_bfp_round_equals_bfp_quantize():
    """The simulated backend's one-pass BFP rounding against dsq.formats.bfp_quantize, bit for bit:
    ties, zero blocks, subnormal blocks whose step would underflow, the largest floats, NaN and
    infinities, ragged and oversized blocks; contiguous (in one run of positions or several, and
    over 4 MiB), channels-last and (N, C) inputs."""
    if not int_kernel.cpu_kernel_available():
        pytest.skip("the CPU kernel does not run here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 5, 19, generator=g) * torch.exp2(torch.randint(-140, 120, (3, 1, 5, 19), generator=g))
    x[0, :8, 0, 0] = torch.tensor([2.0, 0.5, -0.5, 1.5, -1.5, 2.5, 0.0, 3 / 64])  # ties
    x[0, :, 1, 0] = 0
    x[1, :, 2, 3] = 1e-44
    x[1, 5, 3, 3], x[2, 7, 3, 3], x[2, 9, 2, 2] = math.inf, math.nan, -math.inf
    x[2, :, 4, 4] = 3.4e38
    # positions that the kernel reads in more than one run per block (40 channels x 1632 positions
    # at block 64), the last one ragged
    wide = torch.randn(2, 40, 37, 61, generator=g) * torch.exp2(torch.randint(-140, 120, (2, 1, 37, 61), generator=g))
    wide[1, 3, 36, 60] = math.nan
    inputs = [
        x,
        x.contiguous(memory_format=torch.channels_last),
        x.permute(0, 2, 3, 1).reshape(-1, 40).contiguous(),
        wide,
    ]
    # over 4 MiB: written with non-temporal stores (aligned whole vectors) and plain ones (the rest)
    large = torch.randn(1, 40, 160, 193, generator=g) * torch.exp2(
        torch.randint(-140, 120, (1, 1, 160, 193), generator=g)
    )
    cases = [(bits, block, t) for bits in range(2, 9) for block in (1, 3, 16, 64) for t in inputs]
    for bits, block, t in cases + [(8, 32, large), (4, 16, large)]:
        ours = torch.ops.dsq.bfp_round(t, bits, block)
        theirs = bfp_quantize(t, ActFormat(bits, block), dim=1)
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), (bits, block, t.shape)


@pytest.mark.parametrize("channels_last", [False, True])
def test_finish_f64_equals_the_epilogue_reference(channels_last, monkeypatch):
    """dsq::finish_f64 (the exact backend's output epilogue in one pass) against Epilogue.apply,
    bit for bit: NaN, infinities, -0, values that overflow float32 and round to subnormals, 37
    channels (two vectors of 16 and a ragged rest), with and without BatchNorm, residual and clamp;
    and the exact backend calls it on a CPU batch."""
    if not int_kernel.cpu_kernel_available():
        pytest.skip("the CPU kernel does not run here")
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    acc = torch.randn(2, 37, 3, 5, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-160, 140, (2, 37, 3, 5), generator=g).double()
    )
    acc[0, :4, 0, 0] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=torch.float64)
    acc = acc.contiguous(memory_format=fmt)
    scale = torch.rand(37, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(37, generator=g, dtype=torch.float64)
    residual = torch.randn(2, 37, 3, 5, generator=g).contiguous(memory_format=fmt)
    # one pixel: contiguous and channels-last at once, a residual with other strides for its size-1 axes
    pixel = acc[:, :, :1, :1].contiguous(memory_format=fmt)
    pixel_residual = torch.randn(2, 1, 1, 37, generator=g).permute(0, 3, 1, 2)
    for a, epilogue, res in [
        (acc, Epilogue(), None),
        (acc, Epilogue(scale, shift, 0.0, 6.0), residual),
        (acc, Epilogue(scale, shift), None),
        (acc, Epilogue(None, None, 0.0, math.inf), residual),
        (pixel, Epilogue(scale, shift, 0.0, math.inf), pixel_residual),
    ]:
        ours = torch.ops.dsq.finish_f64(a, epilogue.scale, epilogue.shift, res, epilogue.lo, epilogue.hi)
        theirs = epilogue.apply(a, None, res)
        assert ours.is_contiguous(memory_format=fmt)
        assert torch.equal(ours.contiguous().view(torch.int32), theirs.contiguous().view(torch.int32))
    assert torch.ops.dsq.finish_f64(acc[:0], scale, shift, None, 0.0, 6.0).shape == (0, 37, 3, 5)  # an empty batch
    layer = to_dsconv(nn.Conv2d(16, 8, 3), WeightFormat(), ActFormat(8, 16))
    set_backend(layer, "exact")
    calls, op = [], torch.ops.dsq.finish_f64
    monkeypatch.setattr(torch.ops.dsq, "finish_f64", lambda *a: calls.append(a) or op(*a))
    with torch.inference_mode():
        layer(activations(2, 16, 6, 6).contiguous(memory_format=fmt))
    assert len(calls) == 1


def test_the_simulated_backend_rounds_in_one_pass(monkeypatch):
    """A simulated DSConv layer on a CPU float32 input calls dsq::bfp_round once, and gives what the
    formula gives."""
    if not int_kernel.cpu_kernel_available():
        pytest.skip("the CPU kernel does not run here")
    layer = to_dsconv(nn.Conv2d(16, 8, 3), WeightFormat(), ActFormat(8, 16))
    x = activations(2, 16, 6, 6)
    calls = []
    op = torch.ops.dsq.bfp_round
    monkeypatch.setattr(torch.ops.dsq, "bfp_round", lambda *a: calls.append(a) or op(*a))
    with torch.inference_mode():
        out = layer(x)
        expected = F.conv2d(bfp_quantize(x, ActFormat(8, 16)), layer.weight, layer.bias)
    assert len(calls) == 1 and torch.equal(out, expected)


@pytest.mark.realdata
def test_fused_resnet20_on_cifar10_predicts_as_the_simulation(resnet20, cifar):
    """The real ResNet-20 (4 bits, block 32, BFP8 inputs) on 1000 CIFAR-10 test images: the fused
    network (BatchNorm rounded once) gives the simulation's top-1 within 0.2 points, and at most
    5 predictions differ (on all 10 000: the same top-1, 81.55 %, benchmarks/fused_accuracy.py)."""
    from torch.utils.data import DataLoader, Subset

    from dsq.data import get_preset, open_dataset
    from dsq.evaluate import spread_indices
    from dsq.models import load_model

    loaded = load_model(str(resnet20))
    dataset = open_dataset(cifar, get_preset(loaded.preset).transform())
    x, y = next(iter(DataLoader(Subset(dataset, spread_indices(len(dataset), 1000)), batch_size=1000)))
    qmodel, _ = dsq.quantize(loaded.model)
    fused = fuse_int(qmodel)
    assert set(fused.fusions.values()) == {"batchnorm+relu", "batchnorm+add+relu"}
    simulated, ours = (torch.cat([infer(m, b).argmax(1) for b in x.split(250)]) for m in (qmodel, fused))
    assert (simulated != ours).sum() <= 5
    assert abs((simulated == y).float().mean() - (ours == y).float().mean()) <= 0.002
