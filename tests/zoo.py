"""Small model zoo shared by the conversion and artifact tests.

Every builder returns a float model in eval mode whose BatchNorm statistics were re-estimated
on random images (a random-init network with the default running stats 0/1 lets activations
grow layer after layer; re-estimated stats keep them in a realistic range, so relative errors
of quantized outputs mean something). Builders are deterministic (fixed seeds).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torchvision

from dsq.models import build_model


# --------------------------------------------------------------------------- YOLOv8-style detector
class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, 'same' padding for odd kernels."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split in two, run n bottlenecks on one half keeping every intermediate, concat, 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Detect(nn.Module):
    """Decoupled head: per scale a box branch (4 * reg_max) and a class branch (nc)."""

    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 8):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        self.no = nc + 4 * reg_max
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 64))
        # box branch (a grouped 3x3 first), class branch YOLO11-style (depthwise 3x3 + pointwise)
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3, g=2), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(Conv(x, x, 3, g=x), Conv(x, c3, 1)),
                nn.Sequential(Conv(c3, c3, 3, g=c3), Conv(c3, c3, 1)),
                nn.Conv2d(c3, nc, 1),
            )
            for x in ch
        )

    def forward(self, feats):
        n = feats[0].shape[0]
        outs = [torch.cat((b(f), c(f)), 1).view(n, self.no, -1) for f, b, c in zip(feats, self.cv2, self.cv3)]
        return torch.cat(outs, 2)  # (N, 4 * reg_max + nc, sum of H*W over the 3 scales)


class TinyYolo(nn.Module):
    """YOLOv8-style detector: backbone to stride 32, PAN neck (upsample + concat), 3-scale head."""

    def __init__(self, nc: int = 5, w: tuple[int, int, int, int] = (16, 32, 48, 64)):
        super().__init__()
        a, b, c, d = w
        self.b0 = Conv(3, a, 3, 2)  # /2
        self.b1 = Conv(a, b, 3, 2)  # /4
        self.b2 = C2f(b, b, 1, shortcut=True)
        self.b3 = Conv(b, b, 3, 2)  # /8  -> P3
        self.b4 = C2f(b, b, 2, shortcut=True)
        self.b5 = Conv(b, c, 3, 2)  # /16 -> P4
        self.b6 = C2f(c, c, 1, shortcut=True)
        self.b7 = Conv(c, d, 3, 2)  # /32 -> P5
        self.b8 = C2f(d, d, 1, shortcut=True)
        self.b9 = SPPF(d, d)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(d + c, c, 1)  # P4 top-down
        self.n2 = C2f(c + b, b, 1)  # P3 out
        self.n3 = Conv(b, b, 3, 2)
        self.n4 = C2f(b + c, c, 1)  # P4 out
        self.n5 = Conv(c, c, 3, 2)
        self.n6 = C2f(c + d, d, 1)  # P5 out
        self.detect = Detect(nc, (b, c, d))

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        t4 = self.n1(torch.cat((self.up(p5), p4), 1))
        o3 = self.n2(torch.cat((self.up(t4), p3), 1))
        o4 = self.n4(torch.cat((self.n3(o3), t4), 1))
        o5 = self.n6(torch.cat((self.n5(o4), p5), 1))
        return self.detect([o3, o4, o5])


# --------------------------------------------------------------------------- the zoo
@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Re-estimate every BatchNorm's running stats on `x` (cumulative average), then eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(x)
    return model.eval()


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]
    arch: str | None = None  # the name dsq.models.build_model knows it by, if any
    num_classes: int | None = None


def _seeded(fn: Callable[[], nn.Module], shape) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = fn()
        gen = torch.Generator().manual_seed(1)
        return calibrate_bn(model, torch.randn(16, *shape[1:], generator=gen))

    return build


def _effnet() -> nn.Module:
    import pytest

    pytest.importorskip("efficientnet_lite_pytorch")
    return build_model("efficientnet_lite0", 10)


_IMAGENET = (2, 3, 32, 32)  # small inputs keep the CPU test run short; every model here is fully convolutional
ZOO = {
    e.name: e
    for e in [
        ZooEntry(
            "resnet18",
            _seeded(lambda: torchvision.models.resnet18(num_classes=100), _IMAGENET),
            _IMAGENET,
            "resnet18",
            100,
        ),
        ZooEntry(
            "mobilenet_v2",
            _seeded(lambda: torchvision.models.mobilenet_v2(num_classes=10), _IMAGENET),
            _IMAGENET,
            "mobilenet_v2",
            10,
        ),
        ZooEntry(
            "mobilenet_v3_small",
            _seeded(lambda: torchvision.models.mobilenet_v3_small(num_classes=10), _IMAGENET),
            _IMAGENET,
            "mobilenet_v3_small",
            10,
        ),
        ZooEntry(
            "cifar_resnet20",
            _seeded(lambda: build_model("cifar_resnet20"), (2, 3, 32, 32)),
            (2, 3, 32, 32),
            "cifar_resnet20",
            10,
        ),
        ZooEntry("efficientnet_lite0", _seeded(_effnet, _IMAGENET), _IMAGENET, "efficientnet_lite0", 10),
        ZooEntry("tiny_yolo", _seeded(TinyYolo, (2, 3, 64, 64)), (2, 3, 64, 64)),
    ]
}


_PRISTINE: dict[str, dict[str, torch.Tensor]] = {}


@functools.lru_cache(maxsize=None)
def build(name: str) -> nn.Module:
    """The zoo model `name` (cached: treat it as read-only; `pristine_state` is its state as built)."""
    model = ZOO[name].build()
    _PRISTINE[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return model


def pristine_state(name: str) -> dict[str, torch.Tensor]:
    build(name)
    return _PRISTINE[name]


@functools.lru_cache(maxsize=None)
def quantized(name: str, bits: int = 4, rounds: int = 0):
    """(float model, quantized model, report) for `dsq.quantize(model, bits, block=32, rounds)`,
    cached so that the conversion and the artifact tests share one conversion per model."""
    import dsq

    model = build(name)
    qmodel, report = dsq.quantize(model, bits=bits, block=32, rounds=rounds, scale_dtype="float16", depthwise_bits=None)
    return model, qmodel, report


def example_input(name: str, seed: int = 123) -> torch.Tensor:
    return torch.randn(*ZOO[name].input_shape, generator=torch.Generator().manual_seed(seed))


def convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- naive references
# Written from the method spec (docs/dsconv-spec.md) with explicit Python loops, on purpose
# independent of dsq's own block helpers, so the tests compare two different routes.
def ref_slices(w: torch.Tensor, layout: str, block: int) -> list[tuple[tuple, torch.Tensor]]:
    """[(kds index, 1-D slice of real weights)] in KDS order, for a weight (O, I, kh, kw).

    channel: index (o, j, y, x), slice W[o, jB:(j+1)B, y, x];
    flat:    index (o, j),       slice W[o].flatten()[jB:(j+1)B].
    """
    o_n, i_n, kh, kw = w.shape
    out = []
    if layout == "channel":
        nb = -(-i_n // block)
        for o in range(o_n):
            for j in range(nb):
                for y in range(kh):
                    for x in range(kw):
                        out.append(((o, j, y, x), w[o, j * block : (j + 1) * block, y, x]))
    else:
        n = i_n * kh * kw
        nb = -(-n // block)
        for o in range(o_n):
            flat = w[o].reshape(-1)
            for j in range(nb):
                out.append(((o, j), flat[j * block : (j + 1) * block]))
    return out


def ref_scale_shape(shape, layout: str, block: int) -> tuple[int, ...]:
    o_n, i_n, kh, kw = shape
    if layout == "channel":
        return (o_n, -(-i_n // block), kh, kw)
    return (o_n, -(-(i_n * kh * kw) // block))


def ref_layout(in_per_group: int, block: int, groups: int = 1) -> str:
    """dsq's `auto` rule (spec section 1, "Grouped and depthwise convs"): flat blocks for grouped
    and depthwise convs whose groups have fewer input channels than a block, channel blocks
    otherwise (a plain conv such as a 3-channel stem keeps channel blocks)."""
    return "flat" if groups > 1 and in_per_group < block else "channel"


def ref_expand(kds: torch.Tensor, shape, layout: str, block: int) -> torch.Tensor:
    """Each weight's own KDS scale, by explicit index arithmetic: channel c of tap (y, x) reads
    kds[o, c // B, y, x]; flat element k = (c * kh + y) * kw + x reads kds[o, k // B]."""
    o_n, i_n, kh, kw = shape
    if layout == "channel":
        return kds[:, torch.arange(i_n) // block]
    k = torch.arange(i_n * kh * kw).reshape(i_n, kh, kw)
    return kds[:, k // block]


def ref_dequantize(vqk: torch.Tensor, kds: torch.Tensor, layout: str, block: int) -> torch.Tensor:
    shape = tuple(vqk.shape) + (1,) * (4 - vqk.dim())
    return (vqk.reshape(shape).double() * ref_expand(kds.double(), shape, layout, block)).reshape(vqk.shape)


def ref_l2_slice(w: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Spec section 1, one slice, no refinement (float32 like the stored weights)."""
    w = w.astype(np.float32)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not np.any(w):
        return np.zeros_like(w), 0.0
    m = w[np.argmax(np.abs(w))]
    q = np.clip(np.round(w * np.float32(lo / m)), lo, hi)  # np.round: half to even
    alpha = float(np.dot(w.astype(np.float64), q) / np.dot(q, q))
    return q, alpha


def ref_bfp(x: torch.Tensor, bits: int, block: int, dim: int = 1) -> torch.Tensor:
    """Spec section 2 per block: e = floor(log2 max|x|), s = 2^(e-(m-2)), clamp(round(x/s))*s."""
    xt = x.double().movedim(dim, -1)
    out = torch.zeros_like(xt)
    lim = 2 ** (bits - 1) - 1
    c = xt.shape[-1]
    for j in range(0, c, block):
        v = xt[..., j : j + block]
        peak = v.abs().amax(dim=-1, keepdim=True)
        e = torch.floor(torch.log2(torch.where(peak > 0, peak, torch.ones_like(peak))))
        s = torch.pow(2.0, e - (bits - 2))
        q = torch.clamp(torch.round(v / s), -lim, lim) * s
        out[..., j : j + block] = torch.where(peak > 0, q, torch.zeros_like(q))
    return out.movedim(-1, dim).to(x.dtype).contiguous()


class RefBFP:
    """Forward pre-hooks that round a module's input with `ref_bfp` (for whole-model references)."""

    def __init__(self, bits: int, block: int, dim: int = 1):
        self.bits, self.block, self.dim = bits, block, dim

    def __call__(self, module, args):
        x = args[0]
        return (torch.empty_like(x).copy_(ref_bfp(x, self.bits, self.block, self.dim)), *args[1:])
