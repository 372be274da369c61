import socket
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dsq.models import load_model


@pytest.fixture(scope="module")
def resnet18_10() -> dict:
    return torchvision.models.resnet18(num_classes=10).state_dict()


def _prefixed(state_dict: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state_dict.items()}


WRAPPINGS = {
    "dataparallel in state_dict": lambda sd: {"state_dict": _prefixed(sd, "module."), "epoch": 3},
    "compiled in model": lambda sd: {"model": _prefixed(sd, "_orig_mod."), "optimizer": {}},
    "nested net/ema": lambda sd: {"net": {"ema": _prefixed(sd, "module._orig_mod.")}},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "best_prec1": 1.5},
}


@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_wrapped_state_dict_reloads_with_inferred_arch_and_classes(tmp_path, resnet18_10, wrapping):
    path = tmp_path / "resnet18-abc123.pth"
    torch.save(WRAPPINGS[wrapping](resnet18_10), path)
    loaded = load_model(str(path))
    assert (loaded.arch, loaded.preset, loaded.num_classes) == ("resnet18", "imagenet", 10)
    assert loaded.known_top1 is None
    assert loaded.source == str(path) and not loaded.model.training
    assert torch.equal(loaded.model.fc.weight, resnet18_10["fc.weight"])
    assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_safetensors_file(tmp_path, resnet18_10):
    path = tmp_path / "ResNet18_custom.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_10.items()}, path)
    loaded = load_model(str(path))
    assert (loaded.arch, loaded.num_classes) == ("resnet18", 10)
    assert torch.equal(loaded.model.conv1.weight, resnet18_10["conv1.weight"])


def test_explicit_arch_overrides_an_uninformative_name(tmp_path):
    state_dict = torchvision.models.squeezenet1_1(num_classes=7).state_dict()
    torch.save(state_dict, tmp_path / "weights.bin")
    loaded = load_model(str(tmp_path / "weights.bin"), arch="SqueezeNet1-1")
    assert (loaded.arch, loaded.num_classes) == ("squeezenet1_1", 7)  # classifier is a Conv2d


def test_published_file_name_gives_known_top1(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert load_model(str(tmp_path / "resnet18-f37072fd.pth")).known_top1 == pytest.approx(69.758)


def test_training_aux_heads_are_dropped(tmp_path):
    trained = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    torch.save(trained.state_dict(), tmp_path / "googlenet.pt")
    loaded = load_model(str(tmp_path / "googlenet.pt"))
    assert loaded.model.aux1 is None
    assert torch.equal(loaded.model.fc.weight, trained.fc.weight)


def test_name_loads_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    loaded = load_model("resnet18")
    assert (loaded.arch, loaded.source, loaded.num_classes) == ("resnet18", "resnet18", 1000)
    assert loaded.known_top1 == pytest.approx(69.758)
    assert torch.equal(loaded.model.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])


def test_offline_download_fails_fast_with_url_and_cache(tmp_path, monkeypatch, one_line_dsq_error):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # a refused proxy makes the failure certain, online or not
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    start = time.monotonic()
    message = one_line_dsq_error(load_model, "resnet18")
    assert time.monotonic() - start < 15
    assert "could not download the pretrained resnet18 weights" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "dsq quantize resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert socket.getdefaulttimeout() is None
