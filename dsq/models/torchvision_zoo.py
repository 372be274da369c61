"""torchvision's ImageNet classifiers, built in the layout of their published DEFAULT weights."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ..errors import DsqError
from .arch import Arch, StateDict

# Seconds a stalled download socket may wait; a live download never pauses this long.
DOWNLOAD_TIMEOUT_S = 30
# Training-only heads that torchvision removes from googlenet/inception_v3 after loading weights.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def names() -> list[str]:
    """torchvision's classification model names."""
    return list_models(module=torchvision.models)


def _layout(name: str) -> dict:
    """The builder options torchvision sets itself when it loads the DEFAULT weights."""
    if name in ("googlenet", "inception_v3"):
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    if name.startswith("vit_"):
        return {"image_size": get_model_weights(name).DEFAULT.meta["min_size"][0]}
    return {}


def _build(name: str, num_classes: int) -> nn.Module:
    return get_model(name, weights=None, num_classes=num_classes, **_layout(name))


def _top1(weights) -> float | None:
    return weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")


def _pretrained(name: str) -> tuple[StateDict, float | None]:
    weights = get_model_weights(name).DEFAULT
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        model = get_model(name, weights=weights)
    except OSError:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise DsqError(
            f"could not download the pretrained {name} weights (no network?): download {weights.url} "
            f"elsewhere and run `dsq quantize {Path(weights.url).name}`, or put it in {cache}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return model.state_dict(), _top1(weights)


def _top1_of_file(name: str, file_name: str) -> float | None:
    published = {Path(w.url).name: _top1(w) for w in get_model_weights(name)}
    return published.get(file_name)


def _drop_aux_heads(state_dict: StateDict) -> StateDict:
    return {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIXES)}


def arch(name: str) -> Arch:
    """The torchvision classifier `name` (one of `names()`)."""
    return Arch(
        name=name,
        preset="imagenet",
        num_classes=1000,
        build=lambda num_classes: _build(name, num_classes),
        pretrained=lambda: _pretrained(name),
        top1_of_file=lambda file_name: _top1_of_file(name, file_name),
        adapt=_drop_aux_heads,
    )
