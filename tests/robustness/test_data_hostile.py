"""Hostile data folders and images: links, loops, renamed classes, odd image modes, bombs, presets.

Each case ends in a correct result or a one-line DsqError (CLI: `Error: ...`, exit 1) that
names what is wrong; no input file is modified. Small synthetic folders (tmp_path) where they
suffice; real CIFAR-10 test images (read in place, linked) where the case needs real data.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsq.calibration import calibration_files, calibration_set
from dsq.data import CIFAR10_CLASSES, LabelledImages, Preset, get_preset, load_image, open_dataset

from dsq_cli_testkit import CIFAR, RESNET20, error_line, need, run_dsq

CLASSES = ["cat", "dog"]


def small_folders(root: Path, classes=CLASSES, per_class: int = 2) -> Path:
    """root/<class>/<i>.png, each image different (so no two are byte-identical)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (c * 40, i * 20, 7)).save(root / name / f"{i}.png")
    return root


def file_names(dataset) -> list[str]:
    return [os.path.relpath(path, dataset.source) for path, _ in dataset.samples]


# ---- 1. calibration images never judged, whatever their path ----------------------------------


@pytest.mark.realdata
def test_calibration_images_given_through_links_are_left_out(tmp_path):
    """A folder of links to the first 3 test images per class: those 30 are not judged."""
    calib = tmp_path / "calib"
    for name in CIFAR10_CLASSES:
        (calib / name).mkdir(parents=True)
        for image in sorted((need(CIFAR) / name).iterdir())[:3]:
            (calib / name / image.name).symlink_to(image)
    images, judged = calibration_set(calib, 30, get_preset("cifar10").transform(), open_dataset(CIFAR))
    assert len(images) == 30 and len(judged) == 10_000 - 30
    assert str(CIFAR / "cat" / "0000.jpg") not in dict(judged.samples)
    assert "(30 calibration images left out)" in judged.describe()


def test_byte_identical_copies_are_left_out_and_said(tmp_path):
    data = small_folders(tmp_path / "data")
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(data / "cat" / "0.png", calib / "renamed.png")  # a copy, not the same file
    os.link(data / "dog" / "1.png", calib / "hardlink.png")  # the same file under another name
    judged = open_dataset(data).without(calibration_files(calib), "calibration images")
    assert file_names(judged) == ["cat/1.png", "dog/0.png"]
    assert "(2 calibration images left out, 1 of them byte-identical copies)" in judged.describe()


def test_only_files_of_a_calibration_size_are_hashed(tmp_path, monkeypatch):
    import dsq.data.images as images

    data = small_folders(tmp_path / "data")
    (tmp_path / "big.bin").write_bytes(b"x" * 10_000)
    hashed = []
    monkeypatch.setattr(images, "file_digest", lambda path: hashed.append(path) or b"")
    open_dataset(data).without([str(tmp_path / "big.bin")], "calibration images")
    assert hashed == []


# ---- 2. symlink loops and links between folders --------------------------------------------------


def test_symlink_loops_list_every_image_once(tmp_path):
    root = small_folders(tmp_path / "data")
    (root / "cat" / "up").symlink_to(root)  # a loop through the root
    (root / "dog" / "self").symlink_to(root / "dog")  # a loop onto itself
    (root / "dog" / "again.png").symlink_to(root / "dog" / "0.png")  # the same file twice in a class
    dataset = open_dataset(root)
    assert file_names(dataset) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert dataset.targets == [0, 0, 1, 1]
    assert sorted(calibration_files(root, 100)) == sorted(path for path, _ in dataset.samples)


def test_loop_in_calibration_folder_top_level(tmp_path):
    root = tmp_path / "calib"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "loop").symlink_to(root)
    assert calibration_files(root, 100) == [str(root / "a.png")]


# ---- 3. how labels were assigned to renamed class folders --------------------------------------


def test_renamed_class_folders_say_how_they_were_labelled(tmp_path):
    dataset = open_dataset(small_folders(tmp_path / "renamed", [f"class{i}" for i in range(10)], per_class=1))
    assert "labels by sorted folder order: class0=0, class1=1, class2=2 ... class9=9" in dataset.describe()
    assert "not CIFAR-10 class names or ImageNet wnids" in dataset.describe()
    cifar = open_dataset(small_folders(tmp_path / "cifar", list(CIFAR10_CLASSES), per_class=1))
    assert cifar.targets == list(range(10)) and "sorted folder order" not in cifar.describe()


# ---- 4. image modes decode to what a viewer shows -------------------------------------------------

GRADIENT = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0..65535


def rgb_of(tmp_path, image: Image.Image, name: str = "x.png") -> np.ndarray:
    image.save(tmp_path / name)
    return np.asarray(load_image(tmp_path / name))


def test_16_bit_grey_png_is_scaled_not_white(tmp_path):
    image = Image.fromarray(GRADIENT)
    assert image.mode.startswith("I")
    rgb = rgb_of(tmp_path, image)
    assert rgb.shape == (16, 16, 3) and (rgb == (GRADIENT >> 8)[..., None]).all()


def test_32_bit_int_grey_is_read_as_16_bit(tmp_path):
    rgb = rgb_of(tmp_path, Image.fromarray(GRADIENT.astype(np.int32), "I"), "x.tiff")
    assert (rgb[..., 0] == GRADIENT >> 8).all()


def test_float_grey_is_read_on_the_0_to_1_scale(tmp_path):
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    rgb = rgb_of(tmp_path, Image.fromarray(values, "F"), "x.tiff")
    assert np.abs(rgb[..., 1].astype(int) - np.round(values * 255)).max() <= 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)),  # fully transparent red
        lambda: Image.new("LA", (4, 4), (0, 0)),  # fully transparent black
    ],
)
def test_transparent_pixels_are_shown_over_white(tmp_path, make):
    assert (rgb_of(tmp_path, make()) == 255).all()
    assert (np.asarray(get_preset("cifar10").transform().transforms[0](make())) == 255).all()  # a PIL image given


def test_palette_with_alpha_is_shown_over_white():
    from dsq.data.images import to_rgb

    assert (np.asarray(to_rgb(Image.new("PA", (4, 4), (0, 0)))) == 255).all()


def test_palette_transparent_colour_is_shown_over_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    rgb = rgb_of(tmp_path, image)
    assert (rgb[0, 0] == (200, 10, 10)).all() and (rgb[1:, 1:] == 255).all()


def test_half_transparent_pixel_is_blended(tmp_path):
    assert abs(int(rgb_of(tmp_path, Image.new("LA", (2, 2), (0, 128)))[0, 0, 0]) - 127) <= 1


def test_every_mode_decodes_to_what_a_viewer_shows(tmp_path):
    """One table, so that the modes decoded right all along are checked with those that were not."""
    cases = {
        "x.png": (Image.fromarray(np.full((4, 4), 0x8000, np.uint16)), (128, 128, 128)),  # 16-bit grey: not white
        "1.png": (Image.new("1", (4, 4), 1), (255, 255, 255)),
        "l.png": (Image.new("L", (4, 4), 90), (90, 90, 90)),
        "rgb.png": (Image.new("RGB", (4, 4), (1, 2, 3)), (1, 2, 3)),
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        "la.png": (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    }
    wrong = {name: rgb_of(tmp_path, image, name)[0, 0].tolist() for name, (image, _) in cases.items()}
    wrong = {name: got for name, got in wrong.items() if max(abs(a - b) for a, b in zip(got, cases[name][1])) > 2}
    assert wrong == {}


# ---- 5. --data one folder too high ----------------------------------------------------------------


def val_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, "JPEG")


def devkit_parent(top: Path) -> Path:
    val_image(top / "val" / "ILSVRC2012_val_00000001.JPEG")
    data = top / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    return top / "val"


def kaggle_parent(top: Path) -> Path:
    kaggle = top / "imagenet-object-localization-challenge"
    val_image(kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.JPEG")
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1\n")
    return kaggle


def kaggle_ilsvrc(top: Path) -> Path:
    return kaggle_parent(top) / "ILSVRC" / "Data" / "CLS-LOC" / "val"


def torchvision_without_meta(top: Path) -> Path:
    val_image(top / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    return top / "val"


def cifar_parent(top: Path) -> Path:
    return small_folders(top / "cifar10-test", list(CIFAR10_CLASSES), per_class=1)


@pytest.mark.parametrize(
    "make, data",
    [
        (devkit_parent, "."),
        (kaggle_parent, "."),
        (torchvision_without_meta, "."),
        (cifar_parent, "."),
        (kaggle_ilsvrc, "imagenet-object-localization-challenge/ILSVRC"),
    ],
)
@pytest.mark.parametrize("classes", [None, ["n01440764", "n01443537"]])
def test_data_one_folder_too_high_says_where_the_images_are(tmp_path, one_line_dsq_error, make, data, classes):
    images = make(tmp_path)
    message = one_line_dsq_error(open_dataset, tmp_path / data, None, classes)
    assert f"did you mean --data {images}" in message


def test_devkit_parent_with_tarball_says_where_the_images_are(tmp_path, one_line_dsq_error):
    val_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"")  # never read: the folder is wrong first
    message = one_line_dsq_error(open_dataset, tmp_path)
    assert f"did you mean --data {tmp_path / 'val'}" in message


def test_devkit_found_above_the_real_folder_of_a_linked_val(tmp_path):
    """--data is a link to the val folder: the devkit beside the real folder still labels it."""
    from dsq.data.imagenet import find_above

    real_val = devkit_parent(tmp_path / "imagenet")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "val").symlink_to(real_val)
    truth = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    found = find_above(tmp_path / "elsewhere" / "val", truth)
    assert found is not None and found.resolve().parent.parent.parent == (tmp_path / "imagenet").resolve()


# ---- 6. preset numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(crop=100_000), "crop"),
        (dict(crop="100000"), "crop"),
        (dict(resize="9" * 5000), "resize"),
        (dict(resize=1025), "resize"),
        (dict(std="nan"), "std"),
        (dict(std="0.2,inf,0.2"), "std"),
        (dict(mean="nan,0.4,0.4"), "mean"),
        (dict(mean="123.7,116.3,103.5"), "0, 1"),
        (dict(std="58,57,57"), "std"),
        (dict(mean=[True, 0.5, 0.5]), "mean"),
        (dict(interpolation=["bilinear"]), "interpolation"),
    ],
)
def test_bad_preset_numbers_are_refused(one_line_dsq_error, changes, words):
    assert words in one_line_dsq_error(get_preset("imagenet").replace, **changes)


def test_preset_from_dict_round_trip_and_refusals(one_line_dsq_error):
    preset = get_preset("efficientnet_lite1")
    assert Preset.from_dict(preset.to_dict()) == preset
    fields = preset.to_dict()
    assert "recipe.json" in one_line_dsq_error(Preset.from_dict, [1, 2], "recipe.json")
    assert "'size'" in one_line_dsq_error(Preset.from_dict, {**fields, "size": 3})
    assert "'crop'" in one_line_dsq_error(Preset.from_dict, {k: v for k, v in fields.items() if k != "crop"})
    message = one_line_dsq_error(Preset.from_dict, {**fields, "crop": 10**9}, "recipe.json")
    assert message.startswith("recipe.json: preset crop")
    assert "name" in one_line_dsq_error(Preset.from_dict, {**fields, "name": None})


@pytest.mark.realdata
@pytest.mark.parametrize("flag, value", [("--crop", "100000"), ("--std", "nan"), ("--mean", "123.7,116.3,103.5")])
def test_cli_refuses_bad_preset_numbers(flag, value):
    result = run_dsq("eval", need(RESNET20), "--data", need(CIFAR), "--limit", 1, "-j", 0, "-q", flag, value)
    error_line(result, flag.strip("-"))


def test_extreme_aspect_ratio_is_refused_before_the_resize(tmp_path):
    Image.new("L", (1, 100)).save(tmp_path / "thin.png")  # resized to 256 x 25600: over MAX_PIXELS
    dataset = LabelledImages(
        [(str(tmp_path / "thin.png"), 0)],
        ["a"],
        get_preset("imagenet").transform(),
        source=str(tmp_path),
        layout="test",
    )
    with pytest.raises(Exception) as caught:
        dataset[0]
    assert type(caught.value).__name__ == "DsqError" and "thin.png" in str(caught.value)
    assert "aspect ratio" in str(caught.value)


# ---- 8. images that cannot be decoded ---------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height grey pixels (the data stops early)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("zero.jpg", b"", "the file is empty"),
        ("bomb.png", png_declaring(9400, 9400), "decompression bomb"),  # under Pillow's own limit
    ],
    ids=["zero-byte", "bomb-under-pillow-limit"],
)
def test_undecodable_image_is_one_cli_line_naming_it(tmp_path, name, content, words):
    root = small_folders(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    (root / "cat" / name).write_bytes(content)
    result = run_dsq("eval", need(RESNET20), "--data", root, "-j", 2, "-q")
    error_line(result, str(root / "cat" / name), words)
