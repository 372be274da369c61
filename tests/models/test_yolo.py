"""ultralytics YOLO (yolov8n from its yaml, no weights) quantized by dsq: every conv, BatchNorm folding
through ultralytics' own fuse(), predict and val on its bundled images, exports and their sizes,
saving and reloading, and a few steps of ultralytics' trainer on DSConv layers (docs/yolo.md)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsq
from dsq.errors import DsqError
from dsq.models.yolo import (  # sets YOLO_OFFLINE
    check_dataset,
    export_onnx,
    load_yolo,
    quantize_yolo,
    train_yolo,
    ultralytics_module,
)
from dsq.nn import is_dsconv, is_trainable

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / f"dsq-tests-yolo-{os.getuid()}"))
try:  # after dsq.models.yolo, through it: ultralytics reads its environment on import, and writes to it
    ultralytics_module()
except DsqError:
    pytest.skip("ultralytics is not installed (pip install 'dsq[yolo]')", allow_module_level=True)

from ultralytics.utils import ASSETS, YAML  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """ultralytics' predict, val and export set torch's threads to the cores less one (select_device):
    on 2 cores every later test of the session would run on one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


IMAGES = ("bus.jpg", "zidane.jpg")
IMGSZ = 64


def images(size: int = IMGSZ) -> torch.Tensor:
    """The bundled images, resized to size x size, in [0, 1]."""
    return torch.stack(
        [
            torch.from_numpy(np.array(Image.open(ASSETS / name).convert("RGB").resize((size, size))))
            .permute(2, 0, 1)
            .float()
            / 255
            for name in IMAGES
        ]
    )


def head(model, x: torch.Tensor) -> torch.Tensor:
    """The Detect head's raw box and class logits, (N, 64 + 80, anchors)."""
    with torch.no_grad():
        raw = model(x)[1]
    return torch.cat([raw["boxes"], raw["scores"]], 1)


def copy_of(yolo):
    """A YOLO holding a copy of `yolo`'s model (a YOLO that has predicted holds locks: no deepcopy)."""
    fresh = load_yolo("yolov8n.yaml")
    fresh.model = copy.deepcopy(yolo.model)
    return fresh


def convs(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture(scope="module")
def float_yolo():
    """yolov8n with its initial weights and BatchNorm statistics of the bundled images, so that
    the head's outputs depend on the weights (with the initial statistics they are its biases)."""
    yolo = load_yolo("yolov8n.yaml")
    for m in yolo.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics
    yolo.model.train()
    with torch.no_grad():
        yolo.model(images(128))
    yolo.model.eval()
    return yolo


@pytest.fixture(scope="module")
def quantized(float_yolo):
    yolo = copy_of(float_yolo)
    report = quantize_yolo(yolo, bits=4)
    return yolo, report


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A dataset yaml of the two bundled images with hand-written boxes (COCO's 80 names)."""
    root = tmp_path_factory.mktemp("yolo-data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name in IMAGES:
        shutil.copy(ASSETS / name, root / "images" / name)
    (root / "labels/bus.txt").write_text("5 0.50 0.45 0.95 0.50\n0 0.20 0.65 0.20 0.50\n")
    (root / "labels/zidane.txt").write_text("0 0.70 0.55 0.30 0.90\n0 0.30 0.60 0.30 0.80\n")
    names = YAML.load(ASSETS.parent / "cfg/datasets/coco8.yaml")["names"]
    YAML.save(root / "data.yaml", {"path": str(root), "train": "images", "val": "images", "names": names})
    return root / "data.yaml"


def test_every_conv_is_quantized(float_yolo, quantized):
    """All 64 convs: backbone, neck, C2f, SPPF and Detect (its final 1x1 convs and the DFL's)."""
    yolo, report = quantized
    names = convs(float_yolo.model)
    assert len(names) == 64
    assert sorted(name for name, m in yolo.model.named_modules() if is_dsconv(m)) == sorted(names)
    assert len(report.quantized_layers) == 64
    assert {"model.22.cv2.0.2", "model.22.cv3.2.2", "model.22.dfl.conv", "model.9.cv2.conv"} <= set(names)
    assert [row.name for row in report.layers if row.act.startswith("float")] == ["model.0.conv"]  # the image input
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in yolo.model.modules())  # fused before quantizing


def test_quantized_head_agrees_with_float(float_yolo, quantized):
    """The raw head logits of the quantized model stay near float's (random weights: a loose bound)."""
    x = images()
    want, got = head(float_yolo.model, x), head(quantized[0].model, x)
    error = (got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()
    assert 0 < error < 0.2


def test_ultralytics_fuse_folds_batchnorm_into_dsconv(float_yolo):
    """quantize with BatchNorm kept, then ultralytics' own fuse(): VQK untouched, every scale re-rounded
    once to float16 (relative error <= 2^-11, its unit roundoff), so each output moves by at most 2^-11 of the sum of
    the magnitudes of its products (the conv of |input| with |weight|), plus float32 rounding."""
    yolo = copy_of(float_yolo)
    quantize_yolo(yolo, bits=4, fuse=False)
    model = yolo.model
    block = model.model[1]  # an ultralytics Conv: conv, bn, act
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        want = block.bn(block.conv(x))
    vqk = block.conv.vqk.clone()
    model.fuse(verbose=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.equal(block.conv.vqk, vqk)
    with torch.no_grad():
        got = block.conv(x)
        magnitude = torch.nn.functional.conv2d(block.conv.quantize_input(x).abs(), block.conv.weight.abs(), None, 2, 1)
    assert ((got - want).abs() <= 2**-11 * magnitude + 1e-6 * want.abs().max()).all()
    assert (got - want).abs().max() > 0  # the re-rounding shows
    assert head(model, images()).isfinite().all()


def test_predict_on_bundled_images(quantized):
    yolo, _ = quantized
    results = yolo.predict([str(ASSETS / name) for name in IMAGES], imgsz=IMGSZ, conf=0.0, device="cpu", verbose=False)
    assert [r.orig_shape for r in results] == [(1080, 810), (720, 1280)]
    assert all(len(r.boxes) > 0 for r in results)
    runner = yolo.predictor.model.model  # AutoBackend's module: the quantized model, fused
    assert sum(is_dsconv(m) for m in runner.modules()) == 64


def test_val_on_a_local_dataset(quantized, dataset, tmp_path):
    yolo, _ = quantized
    metrics = yolo.val(
        data=str(check_dataset(dataset)), imgsz=IMGSZ, batch=2, device="cpu", workers=0, plots=False, verbose=False,
        project=str(tmp_path), name="val",
    )  # fmt: skip
    assert 0 <= metrics.box.map50 <= 1
    assert metrics.nt_per_class.sum() == 4  # the four hand-written boxes were read


def test_offline_errors(tmp_path):
    with pytest.raises(DsqError, match="would download"):
        load_yolo("yolov8n.pt")
    with pytest.raises(DsqError, match="would download"):
        check_dataset(tmp_path / "coco8.yaml")
    YAML.save(tmp_path / "data.yaml", {"path": str(tmp_path), "train": "images", "val": "images", "names": ["a"]})
    with pytest.raises(DsqError, match="images .* are missing"):
        check_dataset(tmp_path / "data.yaml")


def test_importing_ultralytics_through_dsq_leaves_the_thread_count_of_child_processes_alone():
    """ultralytics' import sets OMP_NUM_THREADS=1 where it is unset: every later subprocess would run
    on one thread (the whole test suite's dsq commands did). Checked in a fresh interpreter."""
    code = (
        "import os; from dsq.models.yolo import ultralytics_module; ultralytics_module('ultralytics.utils'); "
        "import ultralytics; print(os.environ.get('OMP_NUM_THREADS'), ultralytics.__version__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "None"


def test_undecodable_images_stay_one_line_errors_once_ultralytics_is_imported(tmp_path, one_line_dsq_error):
    """ultralytics replaces PIL's Image.open with one that imports pi_heif (not installed) for a format
    Pillow does not know: dsq's image loading still says which file it cannot read."""
    from dsq.data.images import load_image

    bad = tmp_path / "0001.jpg"
    bad.write_bytes(b"not an image at all")
    assert "ultralytics" in Image.open.__module__
    message = one_line_dsq_error(load_image, bad)
    assert "cannot read image" in message and "0001.jpg" in message


def test_torchscript_export_is_smaller_than_float(float_yolo, quantized, tmp_path, monkeypatch):
    """ultralytics' TorchScript export holds int8 VQK and scales, no float copy of the weights."""
    monkeypatch.chdir(tmp_path)  # ultralytics writes next to the model's yaml name, in the working folder
    sizes = {}
    for label, yolo in (("float", float_yolo), ("quantized", quantized[0])):
        path = Path(yolo.export(format="torchscript", imgsz=IMGSZ, device="cpu", verbose=False))
        sizes[label] = path.stat().st_size
        scripted = torch.jit.load(str(path))
    assert sizes["quantized"] < 0.4 * sizes["float"]
    x = images()
    with torch.no_grad():
        assert torch.allclose(scripted(x), quantized[0].model(x)[0], rtol=0, atol=1e-3)


def test_pickled_model_holds_no_float_copy(float_yolo, quantized, tmp_path):
    """ultralytics' .pt (a pickled module) of the quantized model is smaller than float's."""
    yolo, _ = quantized
    head(yolo.model, images())  # fills the layers' cached float weights, which a pickle leaves out
    float_yolo.save(tmp_path / "float.pt")
    yolo.save(tmp_path / "quantized.pt")
    assert (tmp_path / "quantized.pt").stat().st_size < 0.6 * (tmp_path / "float.pt").stat().st_size
    reloaded = load_yolo(tmp_path / "quantized.pt")
    assert sum(is_dsconv(m) for m in reloaded.model.modules()) == 64


@pytest.mark.slow
def test_onnx_exports(float_yolo, quantized, tmp_path, monkeypatch):
    """ultralytics' ONNX export runs in onnxruntime (float-sized: torch folds the dequantization into
    float constants); dsq's export_onnx keeps the 4-bit codes."""
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    yolo, _ = quantized
    x = images()[:1]  # ultralytics exports a batch of one
    with torch.no_grad():
        want = yolo.model(x)[0]
    ours = tmp_path / "dsq.onnx"
    export_onnx(yolo, ours, imgsz=IMGSZ)
    theirs = Path(yolo.export(format="onnx", imgsz=IMGSZ, device="cpu", verbose=False))
    errors = {}
    for path in (ours, theirs):
        session = ort.InferenceSession(str(path))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        errors[path.name] = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    print(errors)
    assert max(errors.values()) < 1e-2  # float summation order flips some BFP roundings; this net amplifies them
    float_size = 4 * sum(p.numel() for p in float_yolo.model.parameters())  # its float32 weights
    assert ours.stat().st_size < 0.2 * float_size < 0.2 * theirs.stat().st_size


def test_save_and_load_round_trip(float_yolo, quantized, tmp_path):
    """dsq's file reloads into a fused yolov8n skeleton, bit for bit."""
    yolo, report = quantized
    sizes = dsq.save(tmp_path / "yolo.dsq", yolo.model, report)
    assert sizes.file_bytes < 0.2 * report.model_float_bytes
    skeleton = load_yolo("yolov8n.yaml").model.fuse(verbose=False)
    loaded, _ = dsq.load(tmp_path / "yolo.dsq", skeleton=skeleton)
    want = yolo.model.state_dict()
    assert (
        all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
        and loaded.state_dict().keys() == want.keys()
    )
    x = images()
    assert torch.equal(head(loaded, x), head(yolo.model, x))


@pytest.mark.slow
def test_ultralytics_trainer_trains_dsconv_layers(float_yolo, dataset, tmp_path):
    """One epoch of ultralytics' trainer with trainable DSConv layers (BatchNorm kept), then frozen."""
    yolo = copy_of(float_yolo)
    quantize_yolo(yolo, bits=4, fuse=False)
    before = {name: m.kds.clone() for name, m in yolo.model.named_modules() if is_dsconv(m)}
    threads = torch.get_num_threads()
    train_yolo(
        yolo, dataset, epochs=1, imgsz=IMGSZ, batch=2, workers=0, device="cpu", amp=False, val=False,
        project=str(tmp_path), name="train",
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # ultralytics set its own; train_yolo put it back
    layers = {name: m for name, m in yolo.model.named_modules() if is_dsconv(m)}
    assert layers.keys() == before.keys() and not is_trainable(yolo.model)
    assert any(not torch.equal(layers[name].kds, kds) for name, kds in before.items())  # the scales trained
    assert torch.equal(layers["model.22.dfl.conv"].kds, before["model.22.dfl.conv"])  # ultralytics freezes the DFL
    results = yolo.predict(str(ASSETS / "bus.jpg"), imgsz=IMGSZ, device="cpu", verbose=False)
    assert results[0].orig_shape == (1080, 810)
