"""Checks of a dsq file's safetensors header and recipe, before anything is built from them.

Every number the file holds is checked against the sizes it implies (the recipe's shapes
against the stored tensors, the tensors against the file's length), so that a damaged or
hostile file fails with one line and no large allocation. (A block wider than its axis is one
block as wide as the axis, `formats.blocks.block_width`: a huge block allocates nothing.) The
checks raise DsqError naming
the bad field; the caller puts the path and "is damaged" in front.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .config import QuantConfig, made
from .errors import DsqError
from .formats import ActFormat, BlockLayout, WeightFormat
from .formats.blocks import CHANNEL, FLAT
from .formats.packing import packed_size

PACKED, SCALES = "vqk.packed", "kds"  # per-layer keys: <layer>.vqk.packed, <layer>.kds
# Bytes per element of the safetensors dtypes (the header's names).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
SCALE_DTYPES = {"F16": "float16", "F32": "float32"}  # the KDS dtypes dsq writes, header name: settings name
PACKED_DTYPE = "U8"
SHA256 = re.compile(r"[0-9a-f]{64}")


def layer_key(layer: str, leaf: str) -> str:
    """The state_dict key of `leaf` in module `layer` ("" is the model itself)."""
    return f"{layer}.{leaf}" if layer else leaf


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the header declares it: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


def shown(value) -> str:
    """`repr(value)` cut to a readable length, for error messages about what a file holds."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(value, kind: type, what: str):
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise DsqError(f"{what} must be a {kind.__name__}, got {shown(value)}")
    return value


def _whole(value, what: str, low: int = 0) -> int:
    if _typed(value, int, what) < low:
        raise DsqError(f"{what} must be at least {low}, got {value}")
    return value


def _field(record: dict, key: str, what: str):
    if key not in record:
        raise DsqError(f"{what} lacks {key!r}")
    return record[key]


def _ints(value, what: str, low: int = 0) -> tuple[int, ...]:
    return tuple(_whole(n, f"{what} entries", low) for n in _typed(value, list, what))


# ---- the header ------------------------------------------------------------------------------


def stored_tensors(header: dict) -> tuple[dict[str, StoredTensor], int]:
    """The header's tensors, each filling exactly its byte range, and where the last range ends."""
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {name!r} in the header"
        dtype = _field(_typed(entry, dict, what), "dtype", what)
        if dtype not in DTYPE_BYTES:
            raise DsqError(f"{what} has an unknown dtype {shown(dtype)}")
        shape = _ints(_field(entry, "shape", what), f"{what}: shape")
        offsets = _ints(_field(entry, "data_offsets", what), f"{what}: data_offsets")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if len(offsets) != 2 or offsets[1] - offsets[0] != nbytes:
            raise DsqError(f"{what} does not fill its byte range {list(offsets)} ({nbytes:,} bytes)")
        tensors[name], end = StoredTensor(dtype, shape), max(end, offsets[1])
    return tensors, end


# ---- the recipe --------------------------------------------------------------------------------


def check_recipe(recipe: dict, tensors: dict[str, StoredTensor]) -> None:
    """DsqError unless every field of `recipe` has its type and range and fits the stored `tensors`."""
    if recipe.get("format") != "dsq":
        raise DsqError(f"its recipe's format is {shown(recipe.get('format'))}, not 'dsq'")
    _typed(_field(recipe, "dsq_version", "the recipe"), str, "dsq_version")
    _optional(recipe, "arch", lambda v, what: _typed(v, str, what))
    _optional(recipe, "num_classes", lambda v, what: _whole(v, what, 1))
    _optional(recipe, "preset", _check_preset)
    _check_settings(_field(recipe, "settings", "the recipe"))
    layers = _typed(_field(recipe, "layers", "the recipe"), dict, "layers")
    for name, layer in layers.items():
        _check_layer(name, layer, tensors)
    rows = _report_rows(_field(recipe, "report", "the recipe"), layers)
    _check_classes(recipe["num_classes"], rows, layers, tensors)
    _optional(recipe, "accuracy", _check_accuracy)
    if not SHA256.fullmatch(str(_field(recipe, "sha256", "the recipe"))):
        raise DsqError("its recipe's sha256 is not a SHA-256 hex digest")


def _optional(recipe: dict, key: str, check) -> None:
    value = _field(recipe, key, "the recipe")
    if value is not None:
        check(value, key)


def _check_preset(preset, what: str) -> None:
    from .data.presets import Preset  # imported here: torchvision loads only when a file has a preset

    _typed(_field(_typed(preset, dict, what), "name", what), str, f"{what} name")
    made(Preset, preset, what)


def _check_settings(settings) -> None:
    """The quantization config that `dsq inspect` shows: a versioned one, or the `dsq.quantize`
    arguments of files written before (older files may lack the newer ones)."""
    QuantConfig.from_dict(settings)


def _stored(tensors: dict[str, StoredTensor], key: str, dtypes, shape: tuple[int, ...]) -> StoredTensor:
    """The stored tensor `key`; DsqError unless it has one of `dtypes` and exactly `shape`."""
    if key not in tensors:
        raise DsqError(f"it lacks the tensor {key}")
    stored = tensors[key]
    if stored.dtype not in dtypes or stored.shape != shape:
        raise DsqError(
            f"tensor {key} is {stored.dtype} {list(stored.shape)}, the recipe needs {'/'.join(dtypes)} {list(shape)}"
        )
    return stored


def _check_layer(name: str, layer, tensors: dict[str, StoredTensor]) -> None:
    """One quantized layer: its formats, and packed codes and scales of the sizes its shape implies."""
    what = f"layer {name!r}"
    _typed(layer, dict, what)
    shape = _ints(_field(layer, "shape", what), f"{what} shape", 1)
    if len(shape) not in (2, 4):
        raise DsqError(f"{what} shape must have 2 or 4 dimensions, got {list(shape)}")
    kind = _field(layer, "layout", what)
    if kind not in (CHANNEL, FLAT):
        raise DsqError(f"{what} layout must be {CHANNEL} or {FLAT}, got {shown(kind)}")
    fmt = made(WeightFormat, _field(layer, "weight_format", what), f"{what} weight_format")
    if _field(layer, "act_format", what) is not None:
        made(ActFormat, layer["act_format"], f"{what} act_format")
    _stored(tensors, layer_key(name, PACKED), (PACKED_DTYPE,), (packed_size(math.prod(shape), fmt.bits),))
    layout = BlockLayout(kind, fmt.block, shape + (1,) * (4 - len(shape)))  # blocks wider than the axis: one
    scales = _stored(tensors, layer_key(name, SCALES), tuple(SCALE_DTYPES), layout.scale_shape)
    if "scale_dtype" in layer["weight_format"] and SCALE_DTYPES[scales.dtype] != fmt.scale_dtype:
        raise DsqError(
            f"{what} weight_format has scale dtype {fmt.scale_dtype}, but its scales are "
            f"stored as {SCALE_DTYPES[scales.dtype]}"
        )


def _report_rows(report, layers: dict) -> list[dict]:
    """The report's per-layer rows, checked; its quantized rows must be exactly the recipe's layers."""
    _whole(_field(_typed(report, dict, "report"), "model_float_bytes", "report"), "report model_float_bytes")
    rows = _typed(_field(report, "layers", "report"), list, "report layers")
    for i, row in enumerate(rows):
        what = f"report layers[{i}]"
        _typed(_field(_typed(row, dict, what), "name", what), str, f"{what} name")
        _typed(_field(row, "quantized", what), bool, f"{what} quantized")
        _typed(_field(row, "note", what), str, f"{what} note")
        _ints(_field(row, "shape", what), f"{what} shape", 1)
    quantized = [row["name"] for row in rows if row["quantized"]]
    if sorted(quantized) != sorted(layers):
        raise DsqError("its report's quantized layers are not the recipe's layers")
    return rows


def _check_classes(num_classes, rows: list[dict], layers: dict, tensors: dict[str, StoredTensor]) -> None:
    """`num_classes`, when given, is the row count of the classifier (the last layer) as stored."""
    if num_classes is None:
        return
    if not rows:
        raise DsqError("its recipe names num_classes but its report has no layers")
    name = rows[-1]["name"]
    if name in layers:
        rows_stored = layers[name]["shape"][0]
    else:
        key = layer_key(name, "weight")
        rows_stored = tensors[key].shape[0] if key in tensors and tensors[key].shape else None
    if rows_stored != num_classes:
        raise DsqError(f"num_classes is {num_classes} but the classifier {name} stores {rows_stored} rows")


def _check_accuracy(accuracy, what: str) -> None:
    """The float and quantized accuracy the file claims: percentages and image counts."""
    for model in ("float", "quantized"):
        result = _typed(_field(_typed(accuracy, dict, what), model, what), dict, f"{what} {model}")
        for key in ("top1", "top5"):  # top-1 always, top-5 when given
            value = result.get(key, 0.0) if key == "top5" else _field(result, key, f"{what} {model}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise DsqError(f"{what} {model} {key} must be a percentage, got {shown(value)}")
        _whole(_field(result, "images", f"{what} {model}"), f"{what} {model} images")
