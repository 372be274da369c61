"""dsq.quantize, dsq.calibrate and dsq.nn.set_backend given hostile arguments and unusual models:
each ends in a one-line DsqError or a correct result, says what it converted or skipped, and
never touches its input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize, spectral_norm, weight_norm

import dsq
from dsq.errors import DsqWarning
from dsq.nn import DSConv2d, is_dsconv

X = torch.randn(2, 3, 8, 8)


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def quiet_quantize(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DsqWarning)
        return dsq.quantize(model, rounds=0, **kwargs)


def with_tensor_value(path: str, value: float) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4))
    with torch.no_grad():
        model.get_parameter(path).view(-1)[0] = value if "running" not in path else None
    return model


def with_buffer_value(path: str, value: float) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model.get_buffer(path)[0] = value
    return model


HOSTILE_MODELS = {
    "None": lambda: None,
    "state_dict": lambda: small().state_dict(),
    "string": lambda: "cifar_resnet20",
    "tensor": lambda: torch.randn(3, 3),
    "meta device": lambda: small().to("meta"),
    "lazy conv": lambda: nn.Sequential(nn.LazyConv2d(8, 3)),
    "scripted": lambda: torch.jit.script(small()),
    "traced": lambda: torch.jit.trace(small(), X),
    "scripted submodule": lambda: nn.Sequential(torch.jit.script(nn.Conv2d(3, 8, 3)), nn.ReLU()),
    "NaN conv weight": lambda: with_tensor_value("0.weight", float("nan")),
    "Inf linear weight": lambda: with_tensor_value("3.weight", float("inf")),
    "NaN BatchNorm weight": lambda: with_tensor_value("1.weight", float("nan")),
    "Inf running_var": lambda: with_buffer_value("1.running_var", float("inf")),
    "NaN running_mean": lambda: with_buffer_value("1.running_mean", float("nan")),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("make", HOSTILE_MODELS.values(), ids=HOSTILE_MODELS)
def test_model_that_cannot_be_quantized(make, one_line_dsq_error):
    model = make()
    message = one_line_dsq_error(dsq.quantize, model)
    if isinstance(model, nn.Module) and "NaN" in message:  # non-finite tensors are named
        assert any(name in message for name, _ in model.named_parameters()) or "running_" in message


HOSTILE_SETTINGS = [
    dict(depthwise_bits=99),
    dict(depthwise_bits=1.5),
    dict(layer_bits="conv=4"),
    dict(layer_bits={3: 4}),
    dict(include=None),
    dict(include=5),
    dict(exclude=[1, 2]),
    dict(exclude={"a": 1}),
]


@pytest.mark.parametrize("kwargs", HOSTILE_SETTINGS, ids=[repr(k) for k in HOSTILE_SETTINGS])
def test_setting_out_of_range_or_of_the_wrong_type(kwargs, one_line_dsq_error):
    one_line_dsq_error(dsq.quantize, small(), **kwargs)


def test_nan_message_names_the_tensor(one_line_dsq_error):
    message = one_line_dsq_error(dsq.quantize, with_buffer_value("1.running_var", float("inf")))
    assert "1.running_var" in message


def test_float64_model_stays_float64():
    model = small().double()
    q, r = dsq.quantize(model, rounds=0)
    with torch.no_grad():
        out, ref = q(X.double()), model(X.double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()) < 0.2
    assert model[0].weight.dtype == torch.float64 and not any(is_dsconv(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_is_quantized_as_a_float32_copy_and_says_so(dtype):
    model = small().to(dtype)
    with pytest.warns(DsqWarning, match=str(dtype).removeprefix("torch.")):
        q, r = dsq.quantize(model, rounds=0)
    assert any("float32 copy" in w for w in r.warnings) and "warnings" in r.to_dict()
    with torch.no_grad():
        out = q(X)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model[0].weight.dtype == dtype  # the input model is untouched


@pytest.mark.parametrize("backend", ["int", "exact"])
def test_float32_backends_refuse_a_float64_model(backend, one_line_dsq_error):
    one_line_dsq_error(dsq.quantize, small().double(), backend=backend)


def _folded_model(kind: str) -> nn.Module:
    model = small()
    if kind == "spectral_norm":
        model[2] = spectral_norm(model[2])
    elif kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model[2] = weight_norm(model[2])
    elif kind == "parametrizations.spectral_norm":
        model[2] = parametrizations.spectral_norm(model[2])
    else:
        parametrize.register_parametrization(model[2], "weight", Doubled())
    with torch.no_grad():
        model.train()(X)  # one power iteration, as training leaves it
    return model.eval()


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm", "parametrizations.spectral_norm", "parametrize"])
def test_reparametrized_weight_is_folded_and_noted(kind):
    model = _folded_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(X)
    q, r = dsq.quantize(model, bits=8, rounds=0, act_bits=None)
    row = next(row for row in r.layers if row.name == "2")
    assert row.quantized and "folded" in row.note
    assert isinstance(q[2], DSConv2d)
    with torch.no_grad():
        out = q(X)
        effective = model[2].weight.detach()
    assert ((out - ref).norm() / ref.norm()) < 0.02  # 8-bit weights of the effective (folded) weight
    assert ((q[2].weight - effective).norm() / effective.norm()) < 0.02
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv1d(3, 4, 3),
        nn.Conv3d(3, 4, 3),
        nn.ConvTranspose1d(3, 4, 3),
        nn.ConvTranspose2d(3, 4, 3),
        nn.ConvTranspose3d(3, 4, 3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_convs_are_listed_as_float_with_the_reason(layer):
    model = nn.ModuleDict({"odd": layer, "conv": nn.Conv2d(3, 4, 3)})
    q, r = quiet_quantize(model)
    rows = {row.name: row for row in r.layers}
    assert set(rows) == {"odd", "conv"} and rows["conv"].quantized
    odd = rows["odd"]
    assert not odd.quantized and type(layer).__name__ in odd.note and "not supported" in odd.note
    assert odd.params == layer.weight.numel() and odd.packed_bytes == odd.float_bytes
    assert any(d["name"] == "odd" and d["note"] == odd.note for d in r.to_dict()["layers"])
    assert type(q["odd"]) is type(layer)
    assert "kept float: odd" in dsq.report.summary(r)


def test_globs_that_match_nothing_warn():
    with pytest.warns(DsqWarning) as caught:
        _, r = dsq.quantize(small(), rounds=0, include=("0", "2", "lyr*"), exclude=("nope",), layer_bits={"zz": 3})
    assert len(r.warnings) == 3 and r.to_dict()["warnings"] == r.warnings
    for what, glob in [("include", "lyr*"), ("exclude", "nope"), ("layer_bits", "zz")]:
        assert sum(what in w and repr(glob) in w for w in r.warnings) == 1, r.warnings
    assert sorted(str(w.message) for w in caught) == sorted(r.warnings)
    assert all("\n" not in w for w in r.warnings)


def test_the_cli_says_each_glob_that_matches_nothing_once_on_stderr(tmp_path):
    from dsq_cli_testkit import RESNET20, need, run_dsq

    result = run_dsq(
        "quantize",
        need(RESNET20),
        "--keep-float",
        "conv9",
        "--layer-bits",
        "layer9.*=6",
        "--layer-bits",
        "layer1.*=6",
        "-q",
        "--json",
        tmp_path / "run.json",
    )
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2 and "'conv9'" in warned[0] and "'layer9.*'" in warned[1], warned
    assert "warning" not in result.stdout
    saved = json.loads((tmp_path / "run.json").read_text())["quantization"]["warnings"]
    assert [f"warning: {w}" for w in saved] == warned


def test_nothing_quantized_warns():
    with pytest.warns(DsqWarning, match="no layer was quantized"):
        _, r = dsq.quantize(nn.Sequential(nn.Linear(4, 4)), rounds=0)
    assert not r.quantized_layers


# ---- dsq.calibrate -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration_case():
    model = small()
    q, r = quiet_quantize(model)
    return model, q, r


def _calibrate(case, images=None, **kwargs):
    model, q, r = case
    import copy

    q = copy.deepcopy(q)
    images = torch.randn(4, 3, 8, 8) if images is None else images
    return dsq.calibrate(
        kwargs.pop("float_model", model), q, kwargs.pop("report", r), images, **{"adapt_steps": 0, **kwargs}
    )


HOSTILE_CALIBRATIONS = {
    "3-d images": dict(images=torch.randn(3, 8, 8)),
    "wrong channels": dict(images=torch.randn(4, 1, 8, 8)),
    "NaN images": dict(images=torch.full((4, 3, 8, 8), float("nan"))),
    "Inf images": dict(images=torch.full((4, 3, 8, 8), float("inf"))),
    "uint8 images": dict(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8)),
    "list of images": dict(images=[torch.randn(3, 8, 8)]),
    "float64 images": dict(images=torch.randn(4, 3, 8, 8, dtype=torch.float64)),
    "no report": dict(report=None),
    "float model is None": dict(float_model=None),
    "float model already quantized": dict(float_model="quantized"),
    "other model": dict(float_model="other"),
    "adapt_steps -1": dict(adapt_steps=-1),
    "adapt_steps 2.5": dict(adapt_steps=2.5),
    "batch_size 0": dict(adapt_steps=1, batch_size=0),
}


@pytest.mark.parametrize("kwargs", HOSTILE_CALIBRATIONS.values(), ids=HOSTILE_CALIBRATIONS)
def test_calibrate_hostile_arguments(kwargs, calibration_case, one_line_dsq_error):
    kwargs = dict(kwargs)
    if kwargs.get("float_model") == "quantized":
        kwargs["float_model"] = calibration_case[1]
    elif kwargs.get("float_model") == "other":
        kwargs["float_model"] = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 3))
    one_line_dsq_error(_calibrate, calibration_case, **kwargs)


def test_calibrate_report_of_another_model(calibration_case, one_line_dsq_error):
    _, other_report = quiet_quantize(small(), exclude=("2",))
    one_line_dsq_error(_calibrate, calibration_case, report=other_report)


def test_calibrate_huge_counts_use_what_exists(calibration_case):
    result = _calibrate(calibration_case, adapt_steps=1, batch_size=10**12, fit_images=10**12)
    assert result.images == result.fit_images == 4
