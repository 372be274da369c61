"""Put a state_dict into a freshly built architecture, sizing its classifier from the weights."""

from __future__ import annotations

from torch import nn

from ..errors import DsqError
from .arch import Arch, StateDict


def classifier_key(model: nn.Module) -> str:
    """State-dict key of the final classifier's weight (the last Linear or Conv2d)."""
    last = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return f"{last}.weight"


def build_for(arch: Arch, state_dict: StateDict) -> tuple[nn.Module, int]:
    """`arch` built with as many classes as the classifier in `state_dict` has, and that number."""
    model = arch.build(arch.num_classes)
    weight = state_dict.get(classifier_key(model))
    if weight is None or weight.ndim < 2 or weight.shape[0] == arch.num_classes:
        return model, arch.num_classes
    return arch.build(weight.shape[0]), weight.shape[0]


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def load_weights(model: nn.Module, state_dict: StateDict, source: str, arch_name: str) -> None:
    """Strictly load `state_dict` into `model`, or raise one DsqError summarising every misfit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {_shape(v.shape)} vs {_shape(expected[k].shape)} expected"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    found = {"missing keys": missing, "unexpected": unexpected, "shape mismatches": mismatched}
    problems = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in found.items() if items]
    if problems:
        raise DsqError(
            f"weights in {source} do not fit architecture {arch_name}: {', '.join(problems)}; pass the right --arch"
        )
    model.load_state_dict(state_dict, strict=True)
