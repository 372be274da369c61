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
from .timm_zoo import is_timm_name


@dataclass
class LoadedModel:
    """A float model in eval mode on CPU, with what is known about it."""

    model: nn.Module
    arch: str  # canonical architecture name, e.g. "resnet50", "cifar_resnet20"
    preset: str  # preprocessing preset: "imagenet", "cifar10", "efficientnet_lite0", "timm/<model>", ...
    source: str  # the path or name it came from
    num_classes: int
    known_top1: float | None  # published float ImageNet top-1 (%) of these exact weights, if known


def load_model(
    source: str, arch: str | None = None, trust_pickle: bool = False, checkpoint: str | None = None
) -> LoadedModel:
    """Load a weights file (architecture from `arch` or the file name), a model name's published
    weights, or a model name's weights from a `checkpoint` file (e.g. timm/resnet50 and its
    model.safetensors)."""
    if checkpoint is not None:
        return _load_checkpoint(source, arch, Path(checkpoint).expanduser(), trust_pickle)
    path = Path(source).expanduser()
    if path.is_dir():
        raise DsqError(f"{source} is a directory; pass a weights file ({' '.join(SUFFIXES)}) or a model name")
    if path.is_file():
        spec = get_arch(arch) if arch else arch_from_filename(path)
        return _assemble(spec, read_state_dict(path, trust_pickle), str(path), spec.top1_of_file(path.name))
    if (path.suffix in SUFFIXES or len(path.parts) > 1) and not is_timm_name(source):
        raise DsqError(f"no such file: {source}; check the path")
    return _load_published(source, arch)


def _load_checkpoint(name: str, arch: str | None, path: Path, trust_pickle: bool) -> LoadedModel:
    if arch:
        raise DsqError(f"with --checkpoint, the model name {name} is the architecture: drop --arch {arch}")
    spec = find_arch(name)
    if spec is None:
        raise DsqError(f"{name!r} is not a model name, which --checkpoint needs{suggest(name)}")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DsqError(f"checkpoint {path} {what}; pass a weights file ({' '.join(SUFFIXES)})")
    return _assemble(spec, read_state_dict(path, trust_pickle), str(path), spec.top1_of_file(path.name))


def _load_published(name: str, arch: str | None) -> LoadedModel:
    spec = find_arch(name)
    if spec is None:
        raise DsqError(f"{name!r} is neither a file nor a known model name{suggest(name)}")
    if arch and get_arch(arch).name != spec.name:
        raise DsqError(f"--arch {arch} contradicts the model name {name}; use --arch only with a weights file")
    if spec.pretrained is None:
        raise DsqError(
            f"{spec.name} has no built-in pretrained weights (dsq downloads none for it): pass a weights "
            "file, or its name with --checkpoint FILE"
        )
    state_dict, top1 = spec.pretrained()
    return _assemble(spec, state_dict, name, top1)


def _assemble(spec: Arch, state_dict: StateDict, source: str, top1: float | None) -> LoadedModel:
    state_dict = spec.adapt(state_dict)
    spec = spec.fitting(state_dict)
    model, num_classes = build_for(spec, state_dict, source)
    return LoadedModel(model.eval(), spec.name, spec.preset, source, num_classes, top1)
