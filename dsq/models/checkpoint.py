"""Read a weights file into a plain state_dict, safely, with one-line errors for bad files."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from ..errors import DsqError
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
            f"{path} holds no weight tensors ({_describe(content)}); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return _strip_prefixes(state_dict)


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
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict
