"""Read a weights file into a plain state_dict, safely, with one-line errors for bad files."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from ..errors import DsqError
from ..finite import all_finite
from .arch import StateDict

SUFFIXES = (".pth", ".pt", ".th", ".tar", ".bin", ".safetensors")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema")
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path, trust_pickle: bool = False) -> StateDict:
    """The tensors in `path`, unwrapped from training checkpoints and stripped of wrapper prefixes."""
    if path.stat().st_size == 0:
        raise DsqError(f"{path} is empty (0 bytes); re-download or re-save it")
    content = _read(path, trust_pickle)
    state_dict = _find_state_dict(content)
    if not state_dict:
        raise DsqError(
            f"{path} holds no weight tensors ({_describe(content)}); save one with torch.save(model.state_dict(), path)"
        )
    for key, tensor in state_dict.items():
        _check_tensor(path, key, tensor)
    return _strip_prefixes(state_dict)


def _check_tensor(path: Path, key: str, tensor: Tensor) -> None:
    """A plain tensor whose data really holds all its numbers, all of them finite.

    A stride-0 or overlapping view declares more numbers than its storage holds: a small file
    could make dsq allocate its declared size. NaN or Inf would be quantized to 0 without a word
    and every accuracy measured on the model would be meaningless, so they are refused.
    """
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise DsqError(f"{path}: tensor {key} is not a plain dense tensor; re-save the model's state_dict")
    held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.numel() > held:
        raise DsqError(
            f"{path} is damaged: tensor {key} declares {tensor.numel():,} numbers but its data "
            f"holds {held:,}; re-save the model's state_dict"
        )
    if not all_finite(tensor):
        raise DsqError(
            f"{path}: tensor {key} holds NaN or infinite values; a model with them has no "
            "meaningful accuracy: fix or retrain it"
        )


def _read(path: Path, trust_pickle: bool) -> object:
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise DsqError(
                f"{path} is a full pickle that can run code when loaded; "
                "rerun with --trust-pickle only if you trust its source"
            ) from None
        raise _unreadable(path, "invalid pickle data") from None
    except (AttributeError, ImportError) as e:
        raise DsqError(
            f"{path} needs Python classes that cannot be imported here ({_first_line(e)}); "
            "re-save it as a state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # torch.load and safetensors raise many types for damaged files
        raise _unreadable(path, f"{type(e).__name__}: {_first_line(e)}") from None


def _unreadable(path: Path, reason: str) -> DsqError:
    return DsqError(
        f"{path} is not a readable PyTorch or safetensors checkpoint ({reason}); "
        "it may be truncated or not a weights file: re-download or re-save it"
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:100] if lines else "no details"


def _find_state_dict(content: object) -> StateDict:
    if isinstance(content, nn.Module):
        return content.state_dict()
    if not isinstance(content, Mapping):
        return {}
    for key in WRAPPER_KEYS:
        found = _find_state_dict(content.get(key))
        if found:
            return found
    return {k: v for k, v in content.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _describe(content: object) -> str:
    if isinstance(content, Mapping):
        keys = ", ".join(map(str, list(content)[:6]))
        return f"top-level keys: {keys}" if keys else "an empty dict"
    return f"a {type(content).__name__}"


def _strip_prefixes(state_dict: StateDict) -> StateDict:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict
