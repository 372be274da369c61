"""dsq.calibrate on small models: what each stage promises, the report, determinism, saving."""

from __future__ import annotations

import copy

import torch

import dsq
from dsq.calibration import calibrate
from dsq.calibration.inputs import output_means
from dsq.nn import is_dsconv

import zoo


def images(name: str, n: int = 48, seed: int = 0) -> torch.Tensor:
    shape = zoo.ZOO[name].input_shape
    return torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))


def quantized(name: str, bits: int):
    model = zoo.build(name)
    qmodel, report = dsq.quantize(model, bits=bits, depthwise_bits=None)
    return model, qmodel, report


def logit_error(model, qmodel, x) -> float:
    with torch.no_grad():
        return (model(x) - qmodel(x)).square().mean().item()


def test_refit_lowers_the_output_error_on_held_out_inputs():
    name = "cifar_resnet20"
    model, qmodel, report = quantized(name, 2)
    free = copy.deepcopy(qmodel)
    result = calibrate(model, qmodel, report, images(name), adapt_steps=0)
    held_out = images(name, 16, seed=1)
    assert logit_error(model, qmodel, held_out) < 0.7 * logit_error(model, free, held_out)
    assert list(result.stages) == ["plan", "sqnr_before", "refit", "sqnr_after"] and result.images == 48
    rows = [r for r in report.layers if r.quantized]
    assert all(r.out_sqnr_before_db is not None and r.out_sqnr_after_db is not None for r in rows)
    assert sum(r.out_sqnr_after_db for r in rows) > sum(r.out_sqnr_before_db for r in rows)
    assert report.calibration["stages"] == result.stages


def test_bias_correction_gives_every_layer_the_float_mean_output():
    model, qmodel, report = quantized("cifar_resnet20", 3)
    x = images("cifar_resnet20", 32)
    calibrate(model, qmodel, report, x, refit=False, bias=True, adapt_steps=0, fit_images=32)
    layers = {n: m for n, m in qmodel.named_modules() if is_dsconv(m)}
    float_layers = dict(model.named_modules())
    want, _ = output_means(model, {n: float_layers[n] for n in layers}, x)
    got, _ = output_means(qmodel, layers, x)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)
    assert all(m.bias is not None for m in layers.values())
    assert report.model_quantized_bytes > 0


def test_batchnorm_reestimation_matches_the_quantized_activations():
    model, qmodel, report = quantized("cifar_resnet20", 2)
    x = images("cifar_resnet20", 64)
    calibrate(model, qmodel, report, x, refit=False, batchnorm=True, adapt_steps=0)
    bn = qmodel.bn1
    seen = {}
    handle = bn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        qmodel(x)
    handle.remove()
    torch.testing.assert_close(bn.running_mean, seen["x"].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not bn.training


def test_adaptation_lowers_the_distillation_loss_deterministically():
    model, qmodel, report = quantized("cifar_resnet20", 2)
    x = images("cifar_resnet20", 64)
    twin = copy.deepcopy(qmodel)
    a = calibrate(model, qmodel, copy.deepcopy(report), x, refit=False, adapt_steps=30, batch_size=16, adapt_lr=1e-3)
    b = calibrate(model, twin, copy.deepcopy(report), x, refit=False, adapt_steps=30, batch_size=16, adapt_lr=1e-3)
    assert a.adapt.steps == 30 and a.adapt.last_loss < 0.8 * a.adapt.first_loss
    assert a.adapt.last_loss == b.adapt.last_loss  # seeded: the same run twice
    for (name, p), (_, q) in zip(qmodel.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(p, q), name
    assert not any("latent" in k for k in qmodel.state_dict())  # frozen again


def test_a_calibrated_model_saves_and_reloads_bit_identically(tmp_path):
    model, qmodel, report = quantized("cifar_resnet20", 4)
    calibrate(model, qmodel, report, images("cifar_resnet20", 32), bias=True, adapt_steps=3, batch_size=8)
    path = tmp_path / "calibrated.dsq"
    dsq.save(path, qmodel, report, arch="cifar_resnet20", num_classes=10)
    loaded, recipe = dsq.load(path)
    x = images("cifar_resnet20", 4, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert recipe["report"]["calibration"]["images"] == 32


def test_no_images_is_a_one_line_error(one_line_dsq_error):
    model, qmodel, report = quantized("cifar_resnet20", 4)
    message = one_line_dsq_error(calibrate, model, qmodel, report, torch.empty(0, 3, 32, 32))
    assert "calibration images" in message


def test_learned_rounding_adaptation_moves_codes_by_one_and_lowers_the_output_error():
    model, qmodel, report = quantized("cifar_resnet20", 2)
    x = images("cifar_resnet20", 64)
    codes = {name: m.vqk.clone() for name, m in qmodel.named_modules() if is_dsconv(m)}
    before = logit_error(model, qmodel, x)
    result = calibrate(
        model, qmodel, report, x, refit=False, adapt_steps=30, batch_size=16, adapt_lr=1e-3, adapt_weights="learned"
    )
    assert result.adapt.last_loss < 0.5 * result.adapt.first_loss
    assert logit_error(model, qmodel, x) < 0.6 * before  # measured: 0.10 -> 0.045 (fixed: 0.023)
    moved = [(m.vqk.int() - codes[name].int()).abs() for name, m in qmodel.named_modules() if is_dsconv(m)]
    assert max(int(d.max()) for d in moved) == 1
    assert not any("rounding" in k for k in qmodel.state_dict())  # frozen again
