"""Put a state_dict into a freshly built architecture, sizing its classifier from the weights."""

from __future__ import annotations

from torch import nn

from ..errors import DsqError
from .arch import Arch, StateDict


def classifier_key(model: nn.Module) -> str:
    """State-dict key of the final classifier's weight (the last Linear or Conv2d)."""
    last = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return f"{last}.weight"


def build_for(arch: Arch, state_dict: StateDict, source: str) -> tuple[nn.Module, int]:
    """`arch` with the weights of `state_dict` and as many classes as its classifier has, and that
    number; the fit is checked on the meta device first, so a misfit allocates nothing."""
    probe = arch.probe(arch.num_classes)
    key = arch.classifier or classifier_key(probe)
    weight = state_dict.get(key)
    num_classes = arch.num_classes if weight is None or weight.ndim < 2 else weight.shape[0]
    if num_classes < 1:
        raise DsqError(f"weights in {source}: the classifier {key} has no rows (no classes)")
    if num_classes != arch.num_classes:
        probe = arch.probe(num_classes)
    check_fit(probe.state_dict(), state_dict, source, arch.name)
    model = arch.build(num_classes)
    model.load_state_dict(state_dict, strict=True)
    return model, num_classes


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _dtype(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_fit(expected: StateDict, state_dict: StateDict, source: str, arch_name: str) -> None:
    """DsqError summarising every misfit of `state_dict` to a model's `expected` state: missing,
    unexpected, of another shape, or not floating point where the model holds floats."""
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    common = [k for k in state_dict if k in expected]
    mismatched = [
        f"{k} {_shape(state_dict[k].shape)} vs {_shape(expected[k].shape)} expected"
        for k in common
        if state_dict[k].shape != expected[k].shape
    ]
    not_float = [
        f"{k} is {_dtype(state_dict[k])}"
        for k in common
        if expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    found = {
        "missing keys": missing,
        "unexpected": unexpected,
        "shape mismatches": mismatched,
        "non-float tensors": not_float,
    }
    problems = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in found.items() if items]
    if problems:
        raise DsqError(
            f"weights in {source} do not fit architecture {arch_name}: {', '.join(problems)}; "
            "pass the right --arch or model name"
        )
