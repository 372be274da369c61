"""Architecture names: canonical names, aliases, and look-up from a name or a weights file name."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from torch import nn

from ..errors import DsqError
from . import cifar_resnet, efficientnet_lite, timm_zoo, torchvision_zoo
from .arch import Arch

EXAMPLES = "resnet50, mobilenet_v2, cifar_resnet20, efficientnet_lite0, timm/<model>"


def known_archs() -> list[str]:
    """Canonical names of every architecture dsq can build."""
    return sorted([*torchvision_zoo.names(), *cifar_resnet.ARCHS, *efficientnet_lite.ARCHS])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@functools.cache
def _canonical() -> dict[str, str]:
    """Normalised name or alias -> canonical name."""
    return {**{_normalise(name): name for name in known_archs()}, **cifar_resnet.ALIASES}


def find_arch(name: str) -> Arch | None:
    """The architecture called `name` (case, `-`/`_` and aliases tolerated; timm's models as
    `timm/<model>`), or None."""
    if timm_zoo.is_timm_name(name):
        return timm_zoo.find(name)
    canonical = _canonical().get(_normalise(name))
    if canonical is None:
        return None
    own = cifar_resnet.ARCHS.get(canonical) or efficientnet_lite.ARCHS.get(canonical)
    return own or torchvision_zoo.arch(canonical)


def suggest(name: str) -> str:
    """'; did you mean ...?' naming close known architectures, or a few examples."""
    if timm_zoo.is_timm_name(name):
        return timm_zoo.suggest(name)
    close = difflib.get_close_matches(_normalise(name), list(_canonical()), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(dict.fromkeys(_canonical()[c] for c in close))}?"
    return f"; known names include {EXAMPLES}"


def get_arch(name: str) -> Arch:
    """The architecture called `name`; DsqError with close matches when unknown."""
    arch = find_arch(name)
    if arch is None:
        raise DsqError(f"unknown architecture {name!r}{suggest(name)}")
    return arch


def arch_from_filename(path: Path) -> Arch:
    """The architecture whose name (the longest that fits) starts the file name: resnet50-0676ba61.pth."""
    stem = _normalise(path.name)
    fits = [
        alias for alias in _canonical() if stem.startswith(alias) and not stem[len(alias) : len(alias) + 1].isdigit()
    ]
    if not fits:
        raise DsqError(
            f"cannot tell the architecture of {path.name} from its name; pass --arch (e.g. {EXAMPLES}, "
            "or any torchvision classification model)"
        )
    return find_arch(max(fits, key=len))


def build_model(arch: str, num_classes: int | None = None) -> nn.Module:
    """A float skeleton of `arch` with initial weights (no download), in eval mode."""
    spec = get_arch(arch)
    return spec.build(num_classes or spec.num_classes).eval()


def state_size(arch: str, num_classes: int | None = None) -> int:
    """How many numbers the state_dict of `arch` holds, counted without allocating them."""
    spec = get_arch(arch)
    return sum(t.numel() for t in spec.probe(num_classes or spec.num_classes).state_dict().values())
