"""timm's CNNs, from the optional `timm` package, by the names `timm/<model>[.<tag>]`.

The architecture is built by `timm.create_model(name, pretrained=False)` (nothing is downloaded:
the weights come from a checkpoint file) and the preprocessing comes from its `pretrained_cfg`.
Re-parameterisable models (RepVGG, MobileOne, FastViT, RepGhost, RepViT, ...) load in either
form: a checkpoint saved after `timm.utils.reparameterize_model` is recognised by its keys and
builds `timm/<model>:reparam`, the fused form. Attention-only models are refused.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..data.presets import TIMM_PREFIX as PREFIX
from ..errors import DsqError
from .arch import Arch, StateDict

REPARAM = ":reparam"  # suffix of the name of a model's re-parameterised (fused) form
# An attention model whose convs hold less than this share of its weights is refused. Measured:
# ViT, DeiT, EVA-02, CaiT, CrossViT, LeViT, TinyViT, XCiT and Swin 0.0-4.4 % (a patch embedding or
# stem); hybrids from 9 % (EdgeNeXt 9.3, CoaT-Lite 9.2, Twins 10.5); CNNs compute no attention.
MIN_CONV_SHARE = 0.05
# Products of two activations: attention's query-key and weights-value steps.
PRODUCTS = frozenset({"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__"})


def timm_module():
    """The `timm` package; DsqError when it is not installed."""
    try:
        import timm
    except ImportError:
        raise DsqError("timm models need the optional package timm: pip install 'dsq[timm]'") from None
    return timm


def is_timm_name(name: str) -> bool:
    return name.strip().lower().startswith(PREFIX)


def _parse(name: str) -> tuple[str, bool]:
    """`timm/<model>[:reparam]` -> (timm's model name, whether the fused form is meant)."""
    model = name.strip().lower().removeprefix(PREFIX)
    return model.removesuffix(REPARAM), model.endswith(REPARAM)


def find(name: str) -> Arch | None:
    """The timm architecture `name` (`timm/<model>[.<tag>][:reparam]`), or None when timm has no such
    model; DsqError for an attention-only model."""
    model, reparam = _parse(name)
    if not timm_module().is_model(model):
        return None
    return _arch(model, reparam)


def suggest(name: str) -> str:
    """'; did you mean ...?' naming close timm models."""
    model, _ = _parse(name)
    close = difflib.get_close_matches(model, timm_module().list_models(), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(PREFIX + c for c in close)}?"
    return "; timm.list_models() lists the names"


@functools.cache
def _arch(model: str, reparam: bool) -> Arch:
    _refuse_attention_only(model)
    cfg = _pretrained_cfg(model)
    heads = [cfg.classifier] if isinstance(cfg.classifier, str) else list(cfg.classifier or [])
    return Arch(
        name=PREFIX + model + (REPARAM if reparam else ""),
        preset=PREFIX + model,
        num_classes=cfg.num_classes or 1000,
        build=functools.partial(_build, model, reparam),
        layout_of=None if reparam else functools.partial(_layout_of, model),
        classifier=f"{heads[0]}.weight" if heads and not reparam else None,  # fusing may rename the head
    )


def _build(model: str, reparam: bool, num_classes: int) -> nn.Module:
    timm = timm_module()
    built = timm.create_model(model, pretrained=False, num_classes=num_classes)
    return timm.models.reparameterize_model(built, inplace=True) if reparam else built


def _keys(arch: Arch) -> set[str]:
    return set(arch.probe(arch.num_classes).state_dict())


def _layout_of(model: str, state_dict: StateDict) -> Arch:
    """The training form of `model`, or its fused form when `state_dict` fits that one better."""
    trained, keys = _arch(model, False), set(state_dict)
    if keys <= _keys(trained):
        return trained
    fused = _arch(model, True)
    return fused if len(keys & _keys(fused)) > len(keys & _keys(trained)) else trained


def _pretrained_cfg(model: str):
    return timm_module().models.get_pretrained_cfg(model)


class _AttentionProbe(TorchFunctionMode):
    """Notes whether a forward computes attention: a product of two activations, or torch's own
    scaled dot-product attention."""

    seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention" or (name in PRODUCTS and _activations(args) >= 2):
            self.seen = True
        return func(*args, **(kwargs or {}))


def _activations(args) -> int:
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return sum(isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) for a in flat)


def _refuse_attention_only(model: str) -> None:
    """DsqError for a model that computes attention and whose convs hold under MIN_CONV_SHARE of
    its weights: dsq quantizes convs and would leave it nearly all float. It is built and run on
    the meta device (shapes only: no memory, no arithmetic)."""
    with torch.device("meta"):
        built = timm_module().create_model(model, pretrained=False).eval()
        convs = sum(m.weight.numel() for m in built.modules() if isinstance(m, nn.Conv2d))
        share = convs / max(sum(p.numel() for p in built.parameters()), 1)
        if share >= MIN_CONV_SHARE:
            return
        probe = _AttentionProbe()
        try:
            with torch.no_grad(), probe:
                built(torch.empty(1, *_pretrained_cfg(model).input_size))
        except Exception:  # a forward that needs real values: no attention seen, so not refused
            return
    if probe.seen:
        raise DsqError(
            f"{PREFIX}{model} is attention-only: it computes attention, and its convs (a patch embedding "
            f"or stem) hold only {100 * share:.2g} % of its weights; dsq quantizes convs, so it would stay "
            "nearly all float: quantize a CNN instead"
        )


def data_config(name: str) -> tuple[str, dict]:
    """(`timm/<model>`, the preprocessing timm's eval transform of that model uses: input_size,
    interpolation, mean, std, crop_pct, crop_mode, from its pretrained_cfg)."""
    model, _ = _parse(name)
    timm = timm_module()
    if not timm.is_model(model):
        raise DsqError(f"unknown preset {name!r}: timm has no model {model!r}{suggest(name)}")
    return PREFIX + model, timm.data.resolve_data_config(pretrained_cfg=_pretrained_cfg(model).to_dict())
