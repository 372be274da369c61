"""`load_model`: a float model, its preprocessing preset and its published accuracy from a file or a name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import DsqError
from .arch import Arch, StateDict
from .checkpoint import SUFFIXES, read_state_dict
from .fit import build_for
from .registry import arch_from_filename, find_arch, get_arch, suggest


@dataclass
class LoadedModel:
    """A float model in eval mode on CPU, with what is known about it."""

    model: nn.Module
    arch: str  # canonical architecture name, e.g. "resnet50", "cifar_resnet20"
    preset: str  # preprocessing preset: "imagenet", "cifar10", "efficientnet_lite0", ...
    source: str  # the path or name it came from
    num_classes: int
    known_top1: float | None  # published float ImageNet top-1 (%) of these exact weights, if known


def load_model(source: str, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a weights file (architecture from `arch` or the file name) or a model name's published weights."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise DsqError(f"{source} is a directory; pass a weights file ({' '.join(SUFFIXES)}) or a model name")
    if path.is_file():
        spec = get_arch(arch) if arch else arch_from_filename(path)
        return _assemble(spec, read_state_dict(path, trust_pickle), str(path), spec.top1_of_file(path.name))
    if path.suffix in SUFFIXES or len(path.parts) > 1:
        raise DsqError(f"no such file: {source}; check the path")
    return _load_published(source, arch)


def _load_published(name: str, arch: str | None) -> LoadedModel:
    spec = find_arch(name)
    if spec is None:
        raise DsqError(f"{name!r} is neither a file nor a known model name{suggest(name)}")
    if arch and get_arch(arch).name != spec.name:
        raise DsqError(f"--arch {arch} contradicts the model name {name}; use --arch only with a weights file")
    if spec.pretrained is None:
        raise DsqError(f"{spec.name} has no built-in pretrained weights; pass a weights file for it instead")
    state_dict, top1 = spec.pretrained()
    return _assemble(spec, state_dict, name, top1)


def _assemble(spec: Arch, state_dict: StateDict, source: str, top1: float | None) -> LoadedModel:
    state_dict = spec.adapt(state_dict)
    model, num_classes = build_for(spec, state_dict, source)
    return LoadedModel(model.eval(), spec.name, spec.preset, source, num_classes, top1)
