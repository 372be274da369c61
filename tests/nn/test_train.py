"""DSConv layers that train (dsq.nn.train): straight-through VQK rounding and BFP, freeze."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsq
from dsq.formats import ActFormat, WeightFormat, bfp_quantize
from dsq.nn import DSConv2d, DSLinear, freeze, is_trainable, make_trainable, parameter_groups, set_backend, to_dsconv
from dsq.nn.train import rounding_penalty
from dsq.nn.trainable_layer import latent_codes, learned_codes, rounding_up

import zoo

MODES = ("ste", "fixed")
C = 16  # C2f width: two 8-channel halves, so block 8 gives full and (at the 24-channel cv2) several blocks


def _c2f(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.C2f(C, C, 1, shortcut=True)


def _quantized_c2f(seed: int = 2) -> tuple[nn.Module, nn.Module, dsq.QuantReport]:
    """(float C2f, its DSConv copy, report): 4-bit, block 8, every conv input in BFP, float32
    scales (trained scales then save as they are)."""
    model = _c2f(seed)
    qmodel, report = dsq.quantize(model, bits=4, block=8, quantize_image_input=True, scale_dtype="float32")
    return model, qmodel, report


def _scratch_c2f(seed: int = 2) -> nn.Module:
    """A C2f whose convs are DSConv2d layers built from scratch, as the seed code builds networks."""
    model = _c2f(seed)
    for m in model.modules():
        if isinstance(m, zoo.Conv):
            c = m.conv
            m.conv = DSConv2d(
                c.in_channels,
                c.out_channels,
                c.kernel_size,
                c.stride,
                c.padding,
                groups=c.groups,
                bias=False,
                weight_format=WeightFormat(bits=4, block=8),
                act_format=ActFormat(8, 8),
            )
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny training loops: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed seeded inputs and the output of a fixed random float C2f teacher on them."""
    x = torch.randn(4, C, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher = _c2f(1).eval()
    with torch.no_grad():
        return x, teacher(x)


def _fit(model: nn.Module, params, x, y, steps: int = 30, opt=torch.optim.Adam, **kw) -> list[float]:
    optimizer = opt(list(params), **kw)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", MODES)
def test_c2f_trains_with_every_parameter(task, mode):
    x, y = task
    _, qmodel, _ = _quantized_c2f()
    make_trainable(qmodel, mode)
    losses = _fit(qmodel.train(), qmodel.parameters(), x, y, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0], losses  # measured: 0.05 (ste), 0.13 (fixed)


@pytest.mark.parametrize("mode", MODES)
def test_c2f_trains_through_dsconv_parameters_alone(task, mode):
    """BatchNorm fixed (eval mode) and biases untouched: the scales (and latent weights) do it."""
    x, y = task
    _, qmodel, _ = _quantized_c2f()
    params = make_trainable(qmodel, mode)
    assert {n.rsplit(".", 1)[1] for n in params} == ({"kds", "latent"} if mode == "ste" else {"kds"})
    losses = _fit(qmodel.eval(), params.values(), x, y, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 0.10 (ste), 0.32 (fixed)


def test_dsconv2d_from_scratch_trains_with_sgd(task):
    x, y = task
    model = _scratch_c2f()
    params = make_trainable(model)
    assert len(params) == 2 * 4  # cv1, cv2, and the bottleneck's two convs
    losses = _fit(model.train(), model.parameters(), x, y, opt=torch.optim.SGD, lr=0.1, momentum=0.9)
    assert losses[-1] < 0.3 * losses[0], losses  # measured: 0.07


def test_make_trainable_keeps_the_output_and_the_state_keys():
    _, qmodel, _ = _quantized_c2f()
    x = torch.randn(2, C, 6, 6, generator=torch.Generator().manual_seed(3))
    before, keys = qmodel(x), set(qmodel.state_dict())
    make_trainable(qmodel, "fixed")
    assert set(qmodel.state_dict()) == keys
    assert torch.equal(qmodel(x), before)
    freeze(qmodel)
    make_trainable(qmodel, "ste")
    assert set(qmodel.state_dict()) - keys == {n for n, _ in qmodel.named_parameters() if n.endswith(".latent")}
    assert torch.equal(qmodel(x), before)
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_gradients_reach_kds_latent_and_earlier_layers_through_bfp():
    _, qmodel, _ = _quantized_c2f()
    make_trainable(qmodel)
    x = torch.randn(2, C, 6, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    qmodel.train()(x).square().sum().backward()
    for name, p in qmodel.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0  # through the first layer's BFP input


def test_bfp_input_is_exact_forward_and_identity_backward():
    layer = DSConv2d(8, 4, 3, padding=1, act_format=ActFormat(4, 4))
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = layer.quantize_input(x)
    assert torch.equal(y, bfp_quantize(x.detach(), ActFormat(4, 4)))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
    with torch.no_grad():  # inference: the plain rounding, no autograd node
        z = layer.quantize_input(x)
    assert torch.equal(z, y) and z.grad_fn is None


def test_ste_gradients_are_lsq_style():
    """d out / d latent passes inside the code range only; d out / d alpha is q - latent / alpha."""
    torch.manual_seed(6)
    layer = DSLinear(8, 1, bias=False, weight_format=WeightFormat(bits=3, block=8), act_format=None)
    make_trainable(layer)
    alpha = layer.kds.detach().reshape(()).abs()
    with torch.no_grad():
        layer.kds.fill_(alpha)
        layer.latent.copy_(alpha * torch.tensor([[-5.0, -4.2, -3.9, -1.4, 0.2, 0.6, 2.5, 3.3]]))
    layer.weight.sum().backward()
    v = layer.latent.detach() / alpha
    q = v.round().clamp(-4, 3)
    inside = (v >= -4) & (v <= 3)
    assert torch.equal(layer.latent.grad, inside.float())
    assert torch.allclose(layer.kds.grad.reshape(()), torch.where(inside, q - v, q).sum())


def test_freeze_round_trip(task, tmp_path):
    x, y = task
    model, qmodel, report = _quantized_c2f()
    keys = set(qmodel.state_dict())
    codes = {name: m.vqk.clone() for name, m in dsq.artifact.dsconv_layers(qmodel)}
    make_trainable(qmodel)
    _fit(qmodel.train(), qmodel.parameters(), x, y, steps=10, lr=1e-2)
    qmodel.eval()
    with torch.no_grad():
        trained = qmodel(x)
    assert len(freeze(qmodel)) == 4 and not is_trainable(qmodel)
    assert set(qmodel.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(qmodel(x), trained)
    changed = 0
    for name, m in dsq.artifact.dsconv_layers(qmodel):
        assert "kds" in m._buffers and "kds" not in m._parameters and not hasattr(m, "latent")
        assert m.vqk.dtype == torch.int8 and -8 <= int(m.vqk.min()) and int(m.vqk.max()) <= 7
        assert not m.weight.requires_grad
        changed += int((m.vqk != codes[name]).sum())
    assert changed > 0  # training moved some latent weights to other codes
    path = tmp_path / "c2f.dsq"
    dsq.save(path, qmodel, report)
    loaded, _ = dsq.load(path, skeleton=model)
    state, reloaded = qmodel.state_dict(), loaded.state_dict()
    assert set(state) == set(reloaded) and all(torch.equal(state[k], reloaded[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained)


def test_freeze_rounds_scales_to_the_file_dtype(task, tmp_path):
    x, y = task
    model = _c2f(2)
    qmodel, report = dsq.quantize(model, bits=4, block=8, scale_dtype="float16")
    make_trainable(qmodel, "fixed")
    _fit(qmodel.train(), qmodel.parameters(), x, y, steps=5, lr=1e-2)
    freeze(qmodel)  # to the layers' float16 scale dtype
    for _, m in dsq.artifact.dsconv_layers(qmodel):
        assert m.kds.dtype == torch.float32 and torch.equal(m.kds.half().float(), m.kds)
    dsq.save(tmp_path / "c2f16.dsq", qmodel, report)  # refuses scales float16 would change


def test_freeze_refuses_scales_beyond_float16_and_changes_nothing(one_line_dsq_error):
    half = WeightFormat(scale_dtype="float16")
    model = nn.Sequential(DSConv2d(8, 4, 1, weight_format=half), DSConv2d(4, 4, 1, weight_format=half))
    make_trainable(model)
    with torch.no_grad():
        model[1].kds.fill_(1e6)
    assert "float32" in one_line_dsq_error(freeze, model)
    assert all("latent" in m._parameters and "kds" in m._parameters for m in model)
    for m in model:
        m.weight_format = WeightFormat(scale_dtype="float32")
    assert freeze(model) == ["0", "1"] and not is_trainable(model)


@pytest.mark.parametrize("mode", MODES + ("learned",))
@pytest.mark.parametrize("backend", ["int", "exact"])
def test_int_and_exact_backends_refuse_a_trainable_model(backend, mode, one_line_dsq_error):
    model, qmodel, _ = _quantized_c2f()
    make_trainable(qmodel, mode, reference=model)
    message = one_line_dsq_error(set_backend, qmodel, backend)
    assert "freeze" in message
    assert all(m.backend == "simulate" for m in qmodel.modules() if hasattr(m, "backend"))
    freeze(qmodel)
    set_backend(qmodel, backend)
    assert all(m.backend == backend for m in qmodel.modules() if hasattr(m, "backend"))
    message = one_line_dsq_error(make_trainable, qmodel)
    assert "simulate" in message


def test_mode_change_needs_a_freeze(one_line_dsq_error):
    _, qmodel, _ = _quantized_c2f()
    first = make_trainable(qmodel, "ste")
    again = make_trainable(qmodel, "ste")
    assert first.keys() == again.keys() and all(first[k] is again[k] for k in first)
    assert "freeze" in one_line_dsq_error(make_trainable, qmodel, "fixed")
    assert "weights mode" in one_line_dsq_error(make_trainable, qmodel, "adaround")
    groups = parameter_groups(qmodel)
    assert len(groups["latent"]) == len(groups["kds"]) == 4
    assert len(groups["other"]) == 2 * 4  # BatchNorm weight and bias of each conv
    assert sum(map(len, groups.values())) == len(list(qmodel.parameters()))


def _layers() -> dict[str, nn.Module]:
    """One layer of every layout: channel, ragged channel blocks, flat, grouped, depthwise, linear."""
    torch.manual_seed(7)
    wf = WeightFormat(bits=4, block=8)
    return {
        "channel": DSConv2d(16, 6, 3, padding=1, weight_format=wf),
        "ragged": DSConv2d(13, 6, 3, padding=1, weight_format=wf, act_format=ActFormat(8, 8)),
        "flat": DSConv2d(13, 6, 3, padding=1, weight_format=WeightFormat(4, 8, layout="flat")),
        "grouped": DSConv2d(12, 6, 3, padding=1, groups=3, weight_format=wf, act_format=ActFormat(8, 8)),
        "depthwise": DSConv2d(12, 12, 3, padding=1, groups=12, weight_format=WeightFormat(3, 8)),
        "linear": DSLinear(20, 5, weight_format=wf, act_format=ActFormat(8, 8)),
        "converted": to_dsconv(nn.Conv2d(10, 4, 1, stride=2), wf, None),
    }


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("mode", MODES)
def test_every_layout_trains_and_freezes(name, mode):
    layer = _layers()[name]
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (3, layer.in_channels, 7, 7)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = layer(x)
    vqk = layer.vqk.clone()
    make_trainable(layer, mode)
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        assert layer.kds.grad.abs().sum() > 0
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        trained = layer(x)
    freeze(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), trained)
    lo, hi = -(2 ** (layer.weight_format.bits - 1)), 2 ** (layer.weight_format.bits - 1) - 1
    assert lo <= int(layer.vqk.min()) and int(layer.vqk.max()) <= hi
    if mode == "fixed":
        assert torch.equal(layer.vqk, vqk)


@pytest.mark.parametrize("mode", MODES)
def test_zero_slices_give_no_nan(mode):
    torch.manual_seed(9)
    conv = nn.Conv2d(16, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, :8] = 0  # block 0 of output 0 is zero at every tap: alpha = 0 there
        conv.weight[2] = 0
    layer = to_dsconv(conv, WeightFormat(bits=4, block=8), ActFormat(8, 8))
    assert int((layer.kds == 0).sum()) == 9 + 2 * 9
    make_trainable(layer, mode)
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(10))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out = layer(x)
        out.square().mean().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    freeze(layer)
    assert torch.isfinite(layer(x)).all()
    assert int(layer.vqk[2].abs().sum()) == 0 and int(layer.vqk[0, :8].abs().sum()) == 0


def test_latent_codes_at_zero_scale():
    latent = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    scale = torch.tensor([0.0, 0.5, 0.5], requires_grad=True)
    codes = latent_codes(latent, scale, 2, ste=True)
    assert codes.tolist() == [0.0, -2.0, 1.0]
    (codes * scale).sum().backward()
    assert torch.isfinite(latent.grad).all() and torch.isfinite(scale.grad).all()


def test_weight_is_cached_for_inference_and_differentiable_for_training():
    layer = DSConv2d(8, 4, 3, padding=1)
    make_trainable(layer)
    assert layer.weight.requires_grad and layer.weight is not layer.weight
    with torch.no_grad():
        w = layer.weight
        assert layer.weight is w and not w.requires_grad
        layer.latent.add_(layer.kds.abs().max() * 0.6 * torch.sign(layer.latent))  # in place, as optimizers step
        assert layer.weight is not w and not torch.equal(layer.weight, w)
    frozen = copy.deepcopy(layer)
    freeze(frozen)
    with torch.no_grad():
        assert torch.equal(frozen.weight, layer.weight)
    assert not frozen.weight.requires_grad and frozen.weight is frozen.weight


def test_no_dsconv_layers(one_line_dsq_error):
    assert "DSConv" in one_line_dsq_error(make_trainable, nn.Sequential(nn.Conv2d(3, 3, 1)))


# ---- weights="learned": AdaRound ------------------------------------------------------------


def _ratios(reference: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """Each DSConv layer's float weight / alpha (its position on the integer grid)."""
    float_layers = dict(reference.named_modules())
    return {
        name: float_layers[name].weight.detach() / m.layout.expand_scales(m.kds.detach()).reshape(m.vqk.shape)
        for name, m in dsq.artifact.dsconv_layers(model)
    }


def _hard(model: nn.Module) -> nn.Module:
    """A copy with every h(V) exactly 0 or 1, as freeze decides: its forward is the hard rounding."""
    hard = copy.deepcopy(model)
    with torch.no_grad():
        for m in hard.modules():
            if "rounding" in m._parameters:
                m.rounding.copy_(torch.where(rounding_up(m.rounding) >= 0.5, 10.0, -10.0))
    return hard


def test_learned_rounding_starts_at_the_stored_integers_and_the_float_weights(task):
    x, _ = task
    model, qmodel, _ = _quantized_c2f()
    keys, codes, ratios = (
        set(qmodel.state_dict()),
        {n: m.vqk.clone() for n, m in qmodel.named_modules() if hasattr(m, "vqk")},
        _ratios(model, qmodel),
    )
    with torch.no_grad():
        before = qmodel(x)
    params = make_trainable(qmodel, "learned", reference=model)
    assert {n.rsplit(".", 1)[1] for n in params} == {"kds", "rounding"}
    assert set(qmodel.state_dict()) - keys == {n for n in params if n.endswith(".rounding")}
    for name, m in dsq.artifact.dsconv_layers(qmodel):
        assert torch.equal(learned_codes(m.rounding, m.rounding_base, 4, hard=True), codes[name].float())
        soft, ratio = learned_codes(m.rounding.detach(), m.rounding_base, 4), ratios[name]
        nearest = ((ratio - codes[name]).abs() < 0.499) & (ratio > -8) & (ratio < 7)
        assert nearest.float().mean() > 0.8  # AdaRound's start: the relaxed code is the float weight / alpha
        torch.testing.assert_close(soft[nearest], ratio[nearest], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(_hard(qmodel)(x), before)
        assert not torch.equal(qmodel(x), before)  # the relaxed weights are the float ones
    freeze(qmodel)
    assert set(qmodel.state_dict()) == keys
    assert all(torch.equal(m.vqk, codes[n]) for n, m in dsq.artifact.dsconv_layers(qmodel))
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_learned_rounding_moves_codes_to_the_other_neighbour_only_and_freezes_hard(task, tmp_path, one_line_dsq_error):
    x, y = task
    model, qmodel, report = _quantized_c2f()
    codes, ratios = {n: m.vqk.clone() for n, m in dsq.artifact.dsconv_layers(qmodel)}, _ratios(model, qmodel)
    make_trainable(qmodel, "learned", reference=model)
    _fit(qmodel.eval(), qmodel.parameters(), x, y, steps=20, lr=0.05)
    with torch.no_grad():
        hard = _hard(qmodel)(x)
    assert "freeze" in one_line_dsq_error(dsq.save, tmp_path / "trainable.dsq", qmodel, report)
    freeze(qmodel)
    with torch.no_grad():
        assert torch.equal(qmodel(x), hard)
    changed = 0
    for name, m in dsq.artifact.dsconv_layers(qmodel):
        q, ratio = m.vqk.float(), ratios[name]
        assert (q - codes[name]).abs().max() <= 1
        nearest = (ratio - codes[name]).abs() <= 0.5  # q0 was round(ratio): q is its floor or ceil now
        assert bool(((q == ratio.floor().clamp(-8, 7)) | (q == ratio.ceil().clamp(-8, 7)))[nearest].all())
        changed += int((m.vqk != codes[name]).sum())
    assert changed > 0


def test_rounding_penalty_drives_every_h_to_0_or_1():
    torch.manual_seed(11)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    layer = to_dsconv(copy.deepcopy(conv), WeightFormat(bits=4, block=8), None)
    x = torch.randn(8, 16, 6, 6, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        target = conv(x)
    make_trainable(layer, "learned", reference=conv)

    def settled() -> float:
        return ((2 * rounding_up(layer.rounding.detach()) - 1).abs() > 0.9).float().mean().item()

    assert settled() < 0.3
    optimizer, steps = torch.optim.Adam([layer.rounding], lr=0.1), 100
    for step in range(steps):
        loss = F.mse_loss(layer(x), target) + 0.01 * rounding_penalty(layer, step / steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert settled() > 0.8  # measured: 0.13 -> 0.86


@pytest.mark.parametrize("name", list(_layers()))
def test_every_layout_learns_its_rounding(name):
    layer = _layers()[name]
    reference = nn.Module()
    reference.weight = nn.Parameter(layer.weight.detach() * (1 + 0.1 * torch.randn(layer.weight.shape)))
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (3, layer.in_channels, 7, 7)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    vqk = layer.vqk.clone()
    make_trainable(layer, "learned", reference=reference)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (layer(x).square().mean() + rounding_penalty(layer, 0.5)).backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        assert layer.rounding.grad.abs().sum() > 0
        optimizer.step()
    with torch.no_grad():
        hard = _hard(layer).eval()(x)
    freeze(layer.eval())
    with torch.no_grad():
        assert torch.equal(layer(x), hard)
    assert (layer.vqk.int() - vqk.int()).abs().max() <= 1


def test_learned_needs_the_float_model(one_line_dsq_error):
    model, qmodel, _ = _quantized_c2f()
    assert "reference" in one_line_dsq_error(make_trainable, qmodel, "learned")
    assert "no layer" in one_line_dsq_error(make_trainable, qmodel, "learned", reference=nn.Conv2d(C, C, 1))
    assert not is_trainable(qmodel)
    make_trainable(qmodel, "learned", reference=model)
    groups = parameter_groups(qmodel)
    assert len(groups["rounding"]) == len(groups["kds"]) == 4 and not groups["latent"]
    assert "learned" in one_line_dsq_error(rounding_penalty, _quantized_c2f()[1], 0.0)
