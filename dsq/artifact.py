"""The quantized model file (docs/file-format.md): a safetensors file holding each DSConv
layer's VQK bit-packed at b bits and its KDS in the scale dtype, every other tensor of the
state_dict as it is, and a JSON recipe in the metadata that says how to rebuild the model.

No pickles: loading runs no code from the file, and it fits nothing: the skeleton's convs
take the stored integers and scales directly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .artifact_check import DTYPE_BYTES, PACKED, SCALES, StoredTensor, check_recipe, shown, stored_tensors
from .artifact_check import layer_key as _key
from .errors import DsqError
from .fileio import atomic_path
from .fingerprint import add_tensor
from .finite import all_finite
from .formats import ActFormat, BlockLayout, WeightFormat, pack_weight, round_scales, scale_torch_dtype, unpack_weight
from .nn import is_dsconv, is_trainable
from .nn.dsconv import from_quantized
from .quant_report import QuantReport

FORMAT = "dsq"
FORMAT_VERSION = 2  # 2: the checksum covers the recipe too; 1: the tensors only (still read)
READABLE_VERSIONS = (1, 2)
SUFFIX = ".dsq"
MAX_HEADER_BYTES = 100 * 2**20
SIGNATURE = b'{"__metadata__":{"dsq":'  # how safetensors starts the header of a file dsq wrote
# Numbers a model holds at most per byte of its file: 2-bit codes pack 4 weights in a byte,
# every other tensor takes at least a byte per number.
MAX_PARAMS_PER_BYTE = 4


def _problem(e: Exception) -> str:
    """The most telling line of an exception's message, cut to a readable length."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return line if len(line) <= 200 else line[:197] + "..."


# ---- writing ---------------------------------------------------------------------------------


def dsconv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every DSConv layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if is_dsconv(m)]


def _stored_scales(name: str, kds: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The KDS in `scale_dtype`; DsqError when that would change it (the reload must be bit-identical)."""
    kds = kds.detach().cpu()
    if not torch.equal(round_scales(kds, scale_dtype, f"layer {name!r}"), kds):
        raise DsqError(
            f"layer {name!r}: its scales are not {scale_dtype} values; quantize with that scale dtype before saving"
        )
    return kds.to(scale_torch_dtype(scale_dtype))


def _layer_recipe(module: nn.Module) -> dict:
    """What rebuilding one DSConv layer needs besides its tensors."""
    act = module.act_format
    return {
        "shape": list(module.vqk.shape),
        "layout": module.layout.kind,
        "weight_format": asdict(module.weight_format),
        "act_format": asdict(act) if act else None,
    }


def _file_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Packed VQK and KDS in its scale dtype of each DSConv layer, every other state entry as it is."""
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    tensors = {}
    for name, m in dsconv_layers(qmodel):
        tensors[_key(name, PACKED)] = pack_weight(state.pop(_key(name, "vqk")), m.layout, m.weight_format.bits)
        tensors[_key(name, SCALES)] = _stored_scales(name, state.pop(_key(name, SCALES)), m.weight_format.scale_dtype)
    tensors.update({k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()})
    return tensors


def _canonical(recipe: dict) -> str:
    """The recipe as checksummed: sorted keys, no spaces, the checksum itself left out."""
    return json.dumps({k: v for k, v in recipe.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))


def checksum(recipe: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the recipe (from format version 2) and every tensor's name, dtype, shape and
    bytes, in name order: the recipe's `sha256`."""
    h = hashlib.sha256()
    if recipe["format_version"] >= 2:
        text = _canonical(recipe)
        h.update(f"{len(text)}|{text}".encode())
    for key in sorted(tensors):
        add_tensor(h, key, tensors[key])
    return h.hexdigest()


def save(
    path: str | os.PathLike,
    qmodel: nn.Module,
    report: QuantReport,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    preset: dict | None = None,
    accuracy: dict | None = None,
) -> FileSizes:
    """Write `qmodel` and its recipe to `path` (atomically); returns the file's size accounting.

    `arch` (a name dsq can build) and `num_classes` let `load` rebuild the model alone;
    without them, `load` needs the float skeleton.

    Args:
        path: the file to write (a `.dsq` file: safetensors with the JSON recipe in its header).
        qmodel, report: what dsq.quantize returned (calibrated or not); a trainable model must
            be frozen first (dsq.nn.freeze).
        arch: the architecture's name, for `load` to rebuild it without a skeleton.
        num_classes: the classifier's class count, with `arch`.
        preset: the preprocessing preset (dsq.data.Preset.to_dict()), for `dsq evaluate`.
        accuracy: measured accuracy to record in the recipe (any JSON values).

    Returns:
        The FileSizes of the written file: per-layer and whole-file bytes and their minimum.
        DsqError for a trainable model, scales that are not values of their scale dtype, or a
        failed write.

    Example:
        >>> import os, tempfile, torch.nn as nn, dsq
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> qmodel, report = dsq.quantize(model, bits=4)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     sizes = dsq.save(os.path.join(folder, "model.dsq"), qmodel, report)
        >>> [(layer.name, layer.bits) for layer in sizes.layers]
        [('0', 4), ('2', 4)]
    """
    if is_trainable(qmodel):
        raise DsqError("the model is trainable (dsq.nn.make_trainable): dsq.nn.freeze(model) before saving it")
    tensors = _file_tensors(qmodel)
    recipe = json.loads(
        json.dumps(
            {  # as a reader will see it: plain JSON values
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dsq_version": __version__,
                "arch": arch,
                "num_classes": num_classes,
                "preset": preset,
                "settings": report.config.to_dict(),
                "layers": {name: _layer_recipe(m) for name, m in dsconv_layers(qmodel)},
                "report": report.to_dict(),
                "accuracy": accuracy,
            },
            default=str,
        )
    )
    recipe["sha256"] = checksum(recipe, tensors)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={FORMAT: json.dumps(recipe, separators=(",", ":"))})
        except (SafetensorError, OSError) as e:
            raise DsqError(f"cannot write {path}: {_problem(e)}") from None
    return file_sizes(path)


# ---- reading the header and the recipe -------------------------------------------------------


def _json(text: bytes | str):
    """The JSON value of `text`, or None when it is not JSON (or nested too deep to read)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length in bytes (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise DsqError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            if _starts_like_dsq(path):
                raise DsqError(f"{path} is truncated: the file ends inside its header")
            raise DsqError(f"{path} is not a dsq model file (no safetensors header)")
        header = _json(f.read(size))
    if not isinstance(header, dict):
        if _starts_like_dsq(path):
            raise DsqError(f"{path} is damaged: its header is not readable JSON")
        raise DsqError(f"{path} is not a dsq model file (its safetensors header is unreadable)")
    return header, size


def _metadata(header: dict) -> dict:
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _starts_like_dsq(path: str | os.PathLike) -> bool:
    """Whether the file begins as dsq files begin (true of a truncated one too)."""
    try:
        with open(path, "rb") as f:
            return f.read(8 + len(SIGNATURE))[8:] == SIGNATURE
    except OSError:
        return False


def is_dsq_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a dsq model file, or a damaged one (`load` then says what is wrong):
    named *.dsq, or beginning or holding what a dsq file does."""
    if Path(path).suffix.lower() == SUFFIX or _starts_like_dsq(path):
        return True
    try:
        return FORMAT in _metadata(_header(path)[0])
    except DsqError:
        return False


def _damaged(path, check, *args):
    """`check(*args)`, its DsqError said of the file `path` as damage."""
    try:
        return check(*args)
    except DsqError as e:
        raise DsqError(f"{path} is damaged: {e}") from None


def _recipe_and_header(path) -> tuple[dict, dict]:
    """The file's recipe, of a version this dsq reads, and its tensors as the header declares them;
    both checked against each other and the file's length, no tensor read."""
    header, header_size = _header(path)
    meta = _metadata(header)
    if FORMAT not in meta:
        raise DsqError(f"{path} is a safetensors file but not a dsq model (no dsq recipe inside)")
    recipe = _json(meta[FORMAT]) if isinstance(meta[FORMAT], str) else None
    if not isinstance(recipe, dict):
        raise DsqError(f"{path} is damaged: its dsq recipe is not readable JSON")
    _check_version(path, recipe.get("format_version"))
    stored, end = _damaged(path, stored_tensors, header)
    file_bytes = Path(path).stat().st_size
    if 8 + header_size + end > file_bytes:
        raise DsqError(
            f"{path} is truncated: its header needs {8 + header_size + end} bytes, the file has {file_bytes}"
        )
    _damaged(path, check_recipe, recipe, stored)
    return recipe, stored


def _check_version(path, version) -> None:
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise DsqError(
            f"{path} has dsq file format version {version}, newer than this dsq {__version__} "
            f"reads (up to {FORMAT_VERSION}): upgrade dsq"
        )
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise DsqError(
            f"{path} has an unknown dsq file format version {shown(version)} "
            f"(this dsq reads {', '.join(map(str, READABLE_VERSIONS))})"
        )


def _read_tensors(path, recipe: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the file, checked against the recipe's checksum and for finite values."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DsqError(f"{path} is damaged or truncated: cannot read its tensors ({_problem(e)})") from None
    if checksum(recipe, tensors) != recipe["sha256"]:
        what = "recipe and tensors do" if recipe["format_version"] >= 2 else "tensors do"
        raise DsqError(f"{path} is damaged: its {what} not match the checksum in its recipe")
    for key, t in tensors.items():
        if not all_finite(t):
            raise DsqError(f"{path} is damaged: tensor {key} holds NaN or infinite values")
    return tensors


def _open(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked recipe and tensors of a dsq file."""
    recipe, _ = _recipe_and_header(path)
    return recipe, _read_tensors(path, recipe)


def read_recipe(path: str | os.PathLike) -> dict:
    """The JSON recipe of a dsq file, every field checked and covered by its checksum; DsqError if
    `path` is not a dsq file, a damaged one, or one this dsq cannot read."""
    return _open(path)[0]


# ---- loading ---------------------------------------------------------------------------------


def _skeleton(path, recipe: dict, tensors: dict[str, torch.Tensor], skeleton: nn.Module | None) -> nn.Module:
    """A copy of the given float skeleton, or the recipe's architecture built by name (once its
    size, counted without building it, is known to fit what the file holds)."""
    if skeleton is not None:
        return copy.deepcopy(skeleton).eval()
    if not recipe["arch"]:
        raise DsqError(
            f"{path} does not name an architecture dsq can build: pass the float skeleton "
            "(dsq.load(path, skeleton=model))"
        )
    from .models import build_model, state_size  # imported here: torchvision and friends load only when needed

    params = state_size(recipe["arch"], recipe["num_classes"])
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    if params > MAX_PARAMS_PER_BYTE * stored:
        raise DsqError(
            f"{path} is damaged: architecture {recipe['arch']} has {params:,} parameters, "
            f"more than its {stored:,} bytes of tensors can hold"
        )
    return build_model(recipe["arch"], recipe["num_classes"])


def _restore_layer(path, model: nn.Module, name: str, layer: dict, tensors: dict) -> None:
    """Make the skeleton's layer `name` a DSConv holding the file's VQK and KDS."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise DsqError(f"{path} does not fit the model: it has no layer {name!r}") from None
    shape = list(getattr(module, "weight", torch.empty(0)).shape)
    if not isinstance(module, (nn.Conv2d, nn.Linear)) or shape != layer["shape"]:
        raise DsqError(
            f"{path} does not fit the model: layer {name} is a {layer['shape']} conv in the file "
            f"but a {type(module).__name__} of weight shape {shape} in the model"
        )
    stored_kds = tensors[_key(name, SCALES)]  # files before the format held its scale dtype: the stored one
    fmt = WeightFormat(**{"scale_dtype": str(stored_kds.dtype).removeprefix("torch."), **layer["weight_format"]})
    act = ActFormat(**layer["act_format"]) if layer["act_format"] else None
    layout = BlockLayout(layer["layout"], fmt.block, tuple(shape + [1] * (4 - len(shape))))
    vqk = unpack_weight(tensors.pop(_key(name, PACKED)), layout, fmt.bits).reshape(shape)
    kds = stored_kds.float()
    from_quantized(module, vqk, kds, layout, fmt, act)
    bias = tensors.get(_key(name, "bias"))
    if bias is not None and module.bias is None:  # a bias that calibration added (bias correction)
        module.bias = nn.Parameter(torch.empty_like(bias))
    tensors[_key(name, "vqk")], tensors[_key(name, SCALES)] = vqk, kds


def _check_dtypes(path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor of the file has the dtype of the model's entry it fills (no silent conversion)."""
    for key, want in model.state_dict().items():
        got = tensors.get(key)
        if got is not None and got.dtype != want.dtype:
            raise DsqError(
                f"{path} does not fit the model: tensor {key} is {str(got.dtype).removeprefix('torch.')}, "
                f"the model holds {str(want.dtype).removeprefix('torch.')}"
            )


def load(path: str | os.PathLike, skeleton: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the quantized model of a dsq file; returns (model, recipe).

    The architecture is rebuilt by name from the recipe; for models dsq cannot build by
    name, pass the float `skeleton` (any weights: a copy of it takes the file's tensors).

    Args:
        path: a file written by dsq.save.
        skeleton: the float model the file was quantized from (its architecture; the weights
            do not matter), needed when the file was saved without `arch`; it is left untouched.

    Returns:
        (model, recipe): the DSConv model in eval mode (simulate backend), its tensors
        bit-identical to the saved model's, and the file's checked JSON recipe (settings,
        layers, report, accuracy, ...).
        DsqError for a damaged file, one of a format version this dsq does not read, or a
        skeleton that does not fit.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, dsq
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> qmodel, report = dsq.quantize(model, bits=4)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = dsq.save(os.path.join(folder, "model.dsq"), qmodel, report)
        ...     loaded, recipe = dsq.load(os.path.join(folder, "model.dsq"), skeleton=model)
        >>> recipe["settings"]["weight"]["bits"]
        4
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.equal(loaded(x), qmodel(x))
        True
    """
    recipe, tensors = _open(path)
    model = _skeleton(path, recipe, tensors, skeleton)
    for name, layer in recipe["layers"].items():
        _restore_layer(path, model, name, layer, tensors)
    _check_dtypes(path, model, tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise DsqError(f"{path} does not fit the model: {_problem(e)}") from None
    return model.eval(), recipe


# ---- size accounting -------------------------------------------------------------------------


@dataclass
class LayerSize:
    """What one quantized layer's weight takes in the file, and its theoretical minimum."""

    name: str
    shape: list[int]
    layout: str
    act: str  # the layer's input: "bfp<bits>/<block>" or "float"
    params: int
    bits: int
    n_scales: int
    scale_bits: int
    file_bytes: int  # packed VQK + KDS as stored

    @property
    def float_bytes(self) -> int:
        return 4 * self.params

    @property
    def min_bytes(self) -> float:
        """b bits per weight plus s bits per scale: b + s / L bits per weight."""
        return (self.params * self.bits + self.n_scales * self.scale_bits) / 8

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.params


@dataclass
class FileSizes:
    """Size accounting of a dsq file: quantized layers, float parts, header, and minimum."""

    path: str
    layers: list[LayerSize]
    float_bytes: int  # every other tensor (BatchNorm, biases, layers kept float), as stored
    file_bytes: int
    model_float_bytes: int  # the float model's state_dict in float32: the float checkpoint's tensors

    @property
    def quantized_float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.file_bytes for r in self.layers)

    @property
    def min_bytes(self) -> float:
        return sum(r.min_bytes for r in self.layers) + self.float_bytes

    @property
    def header_bytes(self) -> int:
        """The safetensors header: tensor index and recipe."""
        return self.file_bytes - self.quantized_bytes - self.float_bytes

    @property
    def above_min(self) -> float:
        """How far the file is above its theoretical minimum, as a fraction."""
        return self.file_bytes / self.min_bytes - 1

    @property
    def weight_ratio(self) -> float:
        """float32 bytes of the quantized layers' weights over their bytes in the file."""
        return self.quantized_float_bytes / max(self.quantized_bytes, 1)

    @property
    def ratio(self) -> float:
        """Float model bytes over file bytes."""
        return self.model_float_bytes / self.file_bytes

    def to_dict(self) -> dict:
        props = (
            "quantized_float_bytes",
            "quantized_bytes",
            "header_bytes",
            "min_bytes",
            "above_min",
            "weight_ratio",
            "ratio",
        )
        layers = [
            {**asdict(r), "float_bytes": r.float_bytes, "min_bytes": r.min_bytes, "bits_per_weight": r.bits_per_weight}
            for r in self.layers
        ]
        return {**asdict(self), "layers": layers, **{p: getattr(self, p) for p in props}}


def act_label(act_format: dict | None) -> str:
    return ActFormat(**act_format).label if act_format else "float"


def _nbytes(stored: StoredTensor) -> int:
    return math.prod(stored.shape) * DTYPE_BYTES[stored.dtype]


def _layer_size(name: str, layer: dict, stored: dict[str, StoredTensor]) -> LayerSize:
    packed, scales = stored.pop(_key(name, PACKED)), stored.pop(_key(name, SCALES))
    return LayerSize(
        name=name,
        shape=layer["shape"],
        layout=layer["layout"],
        act=act_label(layer["act_format"]),
        params=math.prod(layer["shape"]),
        bits=layer["weight_format"]["bits"],
        n_scales=math.prod(scales.shape),
        scale_bits=8 * DTYPE_BYTES[scales.dtype],
        file_bytes=_nbytes(packed) + _nbytes(scales),
    )


def file_sizes(path: str | os.PathLike) -> FileSizes:
    """Per-layer and whole-file size accounting, from the checked header alone (no tensor is read)."""
    recipe, stored = _recipe_and_header(path)
    layers = [_layer_size(name, layer, stored) for name, layer in recipe["layers"].items()]
    return FileSizes(
        str(path),
        layers,
        sum(map(_nbytes, stored.values())),
        Path(path).stat().st_size,
        recipe["report"]["model_float_bytes"],
    )
