"""Resumable runs never report stale or foreign results.

`dsq sweep` and `dsq sensitivity` resume from STEM.json only when it holds a run of the same
kind, settings, model weights (content, not path), images and calibration images, and every
result in it is well-formed; anything else ends in one line and leaves the file as it was.
Two runs never write the same STEM.json at once. A random-weight ResNet-20 and 20 tiny PNGs
keep every run well under a second.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import dsq.resume
import dsq.sweep
from dsq.data import get_preset, open_dataset
from dsq.models import build_model, load_model
from dsq.sweep import Sweep

from dsq_cli_testkit import error_line, folder_listing, run_dsq

MODEL = "resnet20-tiny.pth"


def save_model(path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(build_model("cifar_resnet20").state_dict(), path)


def save_images(folder, seed: int, classes: int = 10, per_class: int = 2) -> None:
    rng = np.random.default_rng(seed)
    for label in range(classes):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{label}" / f"{i}.png")


def make_work(folder):
    """`folder` with a tiny model, 20 labelled images (data/) and 4 calibration images (calib/)."""
    save_model(folder / MODEL, seed=0)
    save_images(folder / "data", seed=0)
    save_images(folder / "calib", seed=1, classes=2)
    return folder


@pytest.fixture
def work(tmp_path):
    return make_work(tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A work folder shared by the tests that leave it alone, and the sw.json of a sweep on it."""
    work = make_work(tmp_path_factory.mktemp("shared"))
    assert sweep(work).exit_code == 0
    return work, (work / "sw.json").read_bytes()


def sweep(work, *extra, output=None):
    return run_dsq(
        "sweep",
        work / MODEL,
        "--data",
        work / "data",
        "--bits",
        "4",
        "--block",
        "16",
        "-j",
        "0",
        "-q",
        "-o",
        output or work / "sw",
        *extra,
    )


def sensitivity(work, *extra):
    return run_dsq(
        "sensitivity",
        work / MODEL,
        "--data",
        work / "data",
        "--include",
        "layer1.0.conv*",
        "-j",
        "0",
        "-q",
        "-o",
        work / "sw",
        *extra,
    )


def replace_keeping_mtime(path, source) -> None:
    """Give `path` the contents of `source`, then its old modification time back."""
    stat = os.stat(path)
    path.write_bytes(source.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def refused(result, *keywords) -> str:
    return error_line(result, "--no-resume", *keywords)


# ---- other inputs at the same paths ---------------------------------------------------------


@pytest.mark.parametrize("command", [sweep, sensitivity])
def test_a_replaced_checkpoint_is_refused_until_no_resume(work, command):
    first = command(work)
    assert first.exit_code == 0, first.output
    save_model(work / MODEL, seed=1)
    refused(command(work), "model weights")
    fresh = command(work, "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert "resuming" not in fresh.stderr
    assert command(work).exit_code == 0  # the new file resumes on the new weights


@pytest.mark.parametrize("folder, named", [("data", "other images"), ("calib", "other calibration images")])
def test_an_image_replaced_under_the_same_name_is_refused(work, folder, named):
    calib = ("--calib", work / "calib", "--calib-images", "4", "--no-refit", "--adapt-steps", "0")
    assert sweep(work, *calib).exit_code == 0
    replace_keeping_mtime(work / folder / "class0/0.png", work / folder / "class1/1.png")
    refused(sweep(work, *calib), named)


def test_a_library_run_on_other_tensors_is_refused(tmp_path, one_line_dsq_error):
    model = build_model("cifar_resnet20")
    images = [(torch.full((3, 32, 32), float(i)), i % 10) for i in range(10)]
    Sweep([4], [16], output=tmp_path / "sw").run(model, images, progress=False)
    images[3] = (torch.zeros(3, 32, 32), 3)
    message = one_line_dsq_error(Sweep([4], [16], output=tmp_path / "sw").run, model, images, progress=False)
    assert "other images" in message


def test_a_run_object_reused_on_another_model_starts_over(tmp_path):
    images = [(torch.randn(3, 32, 32), i % 10) for i in range(10)]
    run = Sweep([4], [16])
    first = run.run(build_model("cifar_resnet20"), images, progress=False).results["float"]
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    other(images[0][0][None])
    second = run.run(other, images, progress=False).results["float"]
    assert second["size_bytes"] != first["size_bytes"]


# ---- files of other runs, and damaged files ----------------------------------------------------


def edit_json(change):
    def edit(path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


def set_result(name, key, value):
    return edit_json(lambda data: data["results"][name].__setitem__(key, value))


def replace_text(old, new):
    return lambda path: path.write_text(path.read_text().replace(old, new, 1))


DAMAGE = {
    "results a list": edit_json(lambda d: d.__setitem__("results", list(d["results"].values()))),
    "a result a list": edit_json(lambda d: d["results"].__setitem__("4b/16", [1, 2])),
    "top1 a string": set_result("4b/16", "top1", "90.0"),
    "top1 a bool": set_result("float", "top1", True),
    "top1 above 100": set_result("4b/16", "top1", 250.0),
    "top5 missing": edit_json(lambda d: d["results"]["float"].pop("top5")),
    "an unknown field": set_result("float", "note", 1),
    "images of another run": set_result("float", "images", 7),
    "bits not the point's": set_result("4b/16", "bits", 8),
    "a name no run makes": edit_json(lambda d: d["results"].__setitem__("best", d["results"]["float"])),
    "settings a list": edit_json(lambda d: d.__setitem__("settings", [])),
    "NaN": replace_text('"top1": ', '"top1": NaN, "x": '),
    "a huge number": replace_text('"top1": ', '"top1": 1e999, "x": '),
    "a huge integer": replace_text('"top1": ', '"top1": 1' + "0" * 5000 + ', "x": '),
    "a repeated key": replace_text('"results": {', '"results": {"4b/16": 5, '),
    "deep nesting": lambda p: p.write_text("[" * 100000 + "]" * 100000),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
    "not UTF-8": lambda p: p.write_bytes(p.read_bytes().replace(b'"float"', b'"fl\xffat"', 1)),
    "empty": lambda p: p.write_bytes(b""),
    "not an object": lambda p: p.write_text("[1, 2]"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_file_is_refused_in_one_line_and_left_alone(finished, tmp_path, damage):
    work, saved = finished
    path = tmp_path / "sw.json"
    path.write_bytes(saved)
    DAMAGE[damage](path)
    before = path.read_bytes() if path.is_file() else None
    line = refused(sweep(work, output=tmp_path / "sw"), "sw.json is damaged")
    assert len(line) < 400, line
    assert (path.read_bytes() if path.is_file() else None) == before


def test_a_pipe_in_place_of_the_results_file_is_refused_unread(finished, tmp_path):
    work, _ = finished
    os.mkfifo(tmp_path / "sw.json")
    error_line(sweep(work, output=tmp_path / "sw"), "sw.json", "pipe")
    assert (tmp_path / "sw.json").is_fifo()


@pytest.mark.parametrize(
    "edit, named",
    [
        (edit_json(lambda d: d["settings"].pop("inputs")), "older dsq"),
        (edit_json(lambda d: d["settings"].__setitem__("limit.x", d["settings"].pop("limit"))), "limit"),
        (edit_json(lambda d: d["settings"]["quantization"].__setitem__("act_bits", 8.0)), "act_bits: 8.0 there, 8 now"),
        (edit_json(lambda d: d["settings"]["quantization"].pop("version")), "older dsq"),
    ],
    ids=["written by an older dsq", "settings nested otherwise", "a setting of another type", "an older layout"],
)
def test_hand_edited_settings_are_refused(finished, tmp_path, edit, named):
    work, saved = finished
    (tmp_path / "sw.json").write_bytes(saved)
    edit(tmp_path / "sw.json")
    refused(sweep(work, output=tmp_path / "sw"), named)


def test_a_sensitivity_file_is_not_resumed_by_a_sweep(work):
    assert sensitivity(work).exit_code == 0
    refused(sweep(work), "not the results of a dsq sweep")


@pytest.mark.parametrize(
    "change",
    [
        ("--limit", "10"),
        ("--preset", "imagenet"),
        ("--rounds", "0"),
        ("--calib", "calib"),
        ("--classes", "classes.txt"),
    ],
)
def test_other_settings_are_refused(work, change):
    (work / "classes.txt").write_text("".join(f"class{9 - i}\n" for i in range(10)))
    assert sweep(work).exit_code == 0
    option, value = change
    refused(sweep(work, option, value if option in ("--limit", "--preset", "--rounds") else work / value))


@pytest.mark.parametrize("change", ["added", "removed"])
def test_an_image_added_or_removed_is_refused(work, change):
    assert sweep(work).exit_code == 0
    image = work / "data/class3/9.png" if change == "added" else work / "data/class3/0.png"
    if change == "added":
        image.write_bytes((work / "data/class3/0.png").read_bytes())
    else:
        image.unlink()
    refused(sweep(work))


# ---- two runs on one output ----------------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_while_the_first_goes(work, monkeypatch):
    """The first run (a library call in a thread) waits inside its first quantization; a second
    `dsq sweep` on the same -o meanwhile is refused, naming the process; the first then finishes."""
    started, go_on, real = threading.Event(), threading.Event(), dsq.sweep.quantize

    def waiting_quantize(model, config):
        started.set()
        assert go_on.wait(60)
        return real(model, config)

    monkeypatch.setattr(dsq.sweep, "quantize", waiting_quantize)
    loaded = load_model(str(work / MODEL))
    dataset = open_dataset(work / "data", get_preset("cifar10").transform())
    first = Sweep([4], [16], output=work / "sw")
    thread = threading.Thread(target=first.run, args=(loaded.model, dataset), kwargs={"progress": False})
    thread.start()
    try:
        assert started.wait(60)
        line = error_line(sweep(work), "being written by another run", f"process {os.getpid()}")
        assert "--output" in line
    finally:
        go_on.set()
        thread.join(60)
    assert set(json.loads((work / "sw.json").read_text())["results"]) == {"float", "4b/16"}
    assert ".sw.json.lock" not in folder_listing(work)


def test_a_lock_file_that_links_elsewhere_is_never_written_through(work):
    target = work / "precious.txt"
    target.write_text("keep me")
    (work / ".sw.json.lock").symlink_to(target)
    error_line(sweep(work), "lock")
    assert target.read_text() == "keep me" and not (work / "sw.json").exists()
