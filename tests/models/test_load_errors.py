import os
import sys
import types
import zipfile

import pytest
import torch
from torch import nn

from dsq.models import build_model, load_model


class Recipe:
    """A custom class: pickling it makes a file that only an unrestricted unpickler can read."""


def test_missing_file(one_line_dsq_error, tmp_path):
    message = one_line_dsq_error(load_model, str(tmp_path / "resnet18.pth"))
    assert message.startswith("no such file:") and "resnet18.pth" in message


def test_directory(one_line_dsq_error, tmp_path):
    assert "is a directory" in one_line_dsq_error(load_model, str(tmp_path))


def _truncated_checkpoint(path):
    torch.save(build_model("cifar_resnet20").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])


BAD_FILES = {
    "random bytes": lambda path: path.write_bytes(os.urandom(4096)),
    "text": lambda path: path.write_text("epoch,loss\n1,0.5\n"),
    "foreign zip": lambda path: zipfile.ZipFile(path, "w").writestr("notes.txt", "hello"),
    "truncated": _truncated_checkpoint,
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_file(one_line_dsq_error, tmp_path, kind):
    path = tmp_path / "resnet20.pth"
    BAD_FILES[kind](path)
    message = one_line_dsq_error(load_model, str(path))
    assert "is not a readable PyTorch or safetensors checkpoint" in message and str(path) in message


def test_corrupt_safetensors(one_line_dsq_error, tmp_path):
    path = tmp_path / "resnet20.safetensors"
    path.write_bytes(os.urandom(256))
    assert "not a readable" in one_line_dsq_error(load_model, str(path))


def test_empty_file(one_line_dsq_error, tmp_path):
    (tmp_path / "resnet20.pth").touch()
    assert "is empty" in one_line_dsq_error(load_model, str(tmp_path / "resnet20.pth"))


def test_file_without_tensors(one_line_dsq_error, tmp_path):
    torch.save({"epoch": 90, "best_prec1": 91.7}, tmp_path / "resnet20.th")
    message = one_line_dsq_error(load_model, str(tmp_path / "resnet20.th"))
    assert "holds no weight tensors" in message and "epoch, best_prec1" in message


def test_weights_of_another_architecture(one_line_dsq_error, tmp_path):
    torch.save(build_model("cifar_resnet20").state_dict(), tmp_path / "resnet18.pth")
    message = one_line_dsq_error(load_model, str(tmp_path / "resnet18.pth"))
    assert "do not fit architecture resnet18" in message and "--arch" in message
    assert "missing keys (e.g. layer1.0.conv1.weight" not in message  # that key exists in both
    assert "unexpected (e.g. layer1.2." in message
    assert "conv1.weight 16x3x3x3 vs 64x3x7x7 expected" in message


def test_unknown_arch_option(one_line_dsq_error, tmp_path):
    torch.save(build_model("cifar_resnet20").state_dict(), tmp_path / "w.pt")
    message = one_line_dsq_error(load_model, str(tmp_path / "w.pt"), arch="cifar-resnt20")
    assert "unknown architecture" in message and "cifar_resnet20" in message


def test_unknown_model_name(one_line_dsq_error):
    message = one_line_dsq_error(load_model, "mobilenetv2")
    assert "neither a file nor a known model name" in message and "mobilenet_v2" in message


@pytest.mark.parametrize("wrap", [lambda m: {"model": m, "recipe": Recipe()}, lambda m: m], ids=["dict", "bare"])
def test_full_pickle_needs_trust(one_line_dsq_error, tmp_path, wrap):
    model = build_model("cifar_resnet20")
    path = tmp_path / "resnet20.pth"
    torch.save(wrap(model), path)
    message = one_line_dsq_error(load_model, str(path))
    assert "full pickle that can run code" in message and "--trust-pickle" in message
    loaded = load_model(str(path), trust_pickle=True)
    assert torch.equal(loaded.model.linear.weight, model.linear.weight)


def test_trusted_pickle_of_unimportable_class(one_line_dsq_error, tmp_path, monkeypatch):
    module = types.ModuleType("dsq_vanished_module")
    module.Net = type("Net", (nn.Linear,), {"__module__": module.__name__})
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module.__name__, module)
        torch.save({"model": module.Net(2, 2)}, tmp_path / "resnet20.pth")
    message = one_line_dsq_error(load_model, str(tmp_path / "resnet20.pth"), trust_pickle=True)
    assert "cannot be imported" in message and "state_dict" in message


def test_arch_without_published_weights(one_line_dsq_error):
    assert "no built-in pretrained weights" in one_line_dsq_error(load_model, "resnet56")


def test_arch_contradicting_the_model_name(one_line_dsq_error):
    assert "contradicts" in one_line_dsq_error(load_model, "efficientnet_lite0", arch="resnet18")
