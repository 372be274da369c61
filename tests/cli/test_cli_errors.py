"""Bad input to `dsq quantize` / `dsq eval`: one clear line, a non-zero exit, no traceback, and
nothing half-written.

Every case runs with its outputs (-o model.dsq and --json run.json for quantize, --json for eval)
pointed into an empty folder `out/`, which must still be empty afterwards: no output file and no
temporary file. `error_line` (dsq_cli_testkit) checks the rest: exactly one 'Error: ...' line
naming the problem (besides the 'data: ...' note the commands print before reading images, and
click's 'Usage:' lines for option-range errors, exit 2), nothing on stdout, no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsq.models import build_model

from conftest import link
from dsq_cli_testkit import CIFAR, IMAGENET_DEV, RESNET20, WNIDS, error_line, folder_listing, need, run_dsq

pytestmark = pytest.mark.realdata


def cifar_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """A class-folder dataset of a few real CIFAR-10 test images, one folder per name in `classes`."""
    real = sorted(p.name for p in need(CIFAR).iterdir())
    for i, name in enumerate(classes):
        for k in range(per_class):
            link(CIFAR / real[i % len(real)] / f"{k:04d}.jpg", root / name / f"{k:04d}.jpg")
    return root


# ---- the cases: tmp_path -> (arguments after the command, key words of the error line) --------


def _missing(tmp: Path):
    return [tmp / "resnet20-missing.th"], ["no such file", "resnet20-missing.th"]


def _random_bytes(tmp: Path):
    (tmp / "resnet20-random.th").write_bytes(os.urandom(5000))
    return [tmp / "resnet20-random.th"], ["resnet20-random.th", "not a readable", "checkpoint"]


def _truncated(tmp: Path):
    data = need(RESNET20).read_bytes()
    (tmp / "resnet20-truncated.th").write_bytes(data[: len(data) // 3])
    return [tmp / "resnet20-truncated.th"], ["resnet20-truncated.th", "not a readable", "truncated"]


def _text_file(tmp: Path):
    (tmp / "resnet20-notes.th").write_text("epoch,loss\n1,0.5\n")
    return [tmp / "resnet20-notes.th"], ["resnet20-notes.th", "not a readable", "checkpoint"]


def _empty_file(tmp: Path):
    (tmp / "resnet20-empty.th").touch()
    return [tmp / "resnet20-empty.th"], ["resnet20-empty.th", "empty"]


def _corrupt_safetensors(tmp: Path):
    (tmp / "resnet20.safetensors").write_bytes(os.urandom(3000))
    return [tmp / "resnet20.safetensors"], ["resnet20.safetensors", "not a readable"]


def _imagenet_arch_on_cifar_weights(tmp: Path):
    return [need(RESNET20), "--arch", "resnet18"], ["do not fit", "resnet18", "--arch"]


def _deeper_cifar_arch(tmp: Path):
    return [need(RESNET20), "--arch", "cifar_resnet32"], ["do not fit", "cifar_resnet32", "missing keys", "--arch"]


def _unknown_arch(tmp: Path):
    return [need(RESNET20), "--arch", "resnet-twenty"], ["unknown architecture", "resnet-twenty"]


def _name_says_no_arch(tmp: Path):
    link(need(RESNET20), tmp / "weights.th")
    return [tmp / "weights.th"], ["cannot tell the architecture", "weights.th", "--arch"]


def _unknown_model_name(tmp: Path):
    return ["resnet2O"], ["resnet2O", "neither a file nor a known model name"]


def _folder_as_model(tmp: Path):
    (tmp / "models").mkdir()
    return [tmp / "models"], ["models", "is a directory"]


def _full_pickle(tmp: Path):
    torch.save(build_model("cifar_resnet20"), tmp / "resnet20-whole.pth")  # the module itself, not a state_dict
    return [tmp / "resnet20-whole.pth"], ["resnet20-whole.pth", "full pickle", "--trust-pickle"]


def _empty_data(tmp: Path):
    (tmp / "images").mkdir()
    return [need(RESNET20), "--data", tmp / "images"], ["images", "is empty", "--data"]


def _class_folders_without_images(tmp: Path):
    for name in ("cat", "dog"):
        (tmp / "images" / name).mkdir(parents=True)
        (tmp / "images" / name / "labels.txt").write_text("not an image\n")
    return [need(RESNET20), "--data", tmp / "images"], ["found 0 images", "images"]


def _file_as_data(tmp: Path):
    (tmp / "images.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    return [need(RESNET20), "--data", tmp / "images.zip"], ["images.zip", "is a file, not a folder"]


def _missing_data(tmp: Path):
    return [need(RESNET20), "--data", tmp / "no-such-images"], ["no-such-images", "does not exist"]


def _twelve_classes(tmp: Path):
    """Mislabelled: 12 class folders for a 10-class model (found after quantization)."""
    data = cifar_folder(tmp / "images", [f"class{i:02d}" for i in range(12)], per_class=1)
    return [need(RESNET20), "--data", data], ["12 classes", "predicts 10", "--classes"]


def _imagenet_files_without_class_list(tmp: Path):
    return [need(RESNET20), "--data", need(IMAGENET_DEV)], ["wnid", "--classes"]


def _imagenet_labels_for_cifar_model(tmp: Path):
    return ([need(RESNET20), "--data", need(IMAGENET_DEV), "--classes", need(WNIDS)], ["1000 classes", "predicts 10"])


def _undecodable_image(tmp: Path):
    """A broken JPEG among real ones: found while evaluating, after quantization (decoded in-process)."""
    data = cifar_folder(tmp / "images", sorted(p.name for p in need(CIFAR).iterdir()), per_class=2)
    (data / "cat" / "0099.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return [need(RESNET20), "--data", data, "-j", 0], ["cannot read image", "0099.jpg", "replace or remove"]


def _undecodable_image_in_a_worker(tmp: Path):
    args, words = _undecodable_image(tmp)
    return [*args[:-2], "-j", 2], words


def _unknown_preset(tmp: Path):
    return [need(RESNET20), "--preset", "cifar100"], ["unknown preset", "cifar100", "cifar10"]


def _bad_resize(tmp: Path):
    return [need(RESNET20), "--resize", "big"], ["resize", "big"]


def _bad_device(tmp: Path):
    return (
        [need(RESNET20), "--data", need(CIFAR), "--limit", 10, "--device", "abacus"],
        ["abacus", "not available", "--device cpu"],
    )


QUANTIZE_CASES = {
    "missing checkpoint": _missing,
    "random bytes": _random_bytes,
    "truncated checkpoint": _truncated,
    "text file": _text_file,
    "empty file": _empty_file,
    "corrupt safetensors": _corrupt_safetensors,
    "imagenet arch on cifar weights": _imagenet_arch_on_cifar_weights,
    "deeper cifar arch": _deeper_cifar_arch,
    "unknown --arch": _unknown_arch,
    "arch not in file name": _name_says_no_arch,
    "unknown model name": _unknown_model_name,
    "folder as model": _folder_as_model,
    "full pickle": _full_pickle,
    "empty data folder": _empty_data,
    "class folders without images": _class_folders_without_images,
    "file as data folder": _file_as_data,
    "missing data folder": _missing_data,
    "12 classes for 10": _twelve_classes,
    "wnid files without class list": _imagenet_files_without_class_list,
    "imagenet labels for cifar model": _imagenet_labels_for_cifar_model,
    "undecodable image": _undecodable_image,
    "undecodable image, worker": _undecodable_image_in_a_worker,
    "unknown preset": _unknown_preset,
    "bad --resize": _bad_resize,
    "bad device": _bad_device,
}

# `dsq eval` shares the loaders; these cases run through it as well.
EVAL_CASES = {
    "missing checkpoint": _missing,
    "truncated checkpoint": _truncated,
    "imagenet arch on cifar weights": _imagenet_arch_on_cifar_weights,
    "full pickle": _full_pickle,
    "empty data folder": _empty_data,
    "12 classes for 10": _twelve_classes,
    "undecodable image": _undecodable_image,
    "unknown preset": _unknown_preset,
    "bad device": _bad_device,
}


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _with_data(args: list) -> list:
    """eval needs --data: add the CIFAR images where a case gives none."""
    return args if "--data" in map(str, args) else [*args, "--data", need(CIFAR), "--limit", 10]


@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_quantize_user_error(case, tmp_path, out):
    args, keywords = QUANTIZE_CASES[case](tmp_path)
    result = run_dsq("quantize", *args, "-q", "-o", out / "model.dsq", "--json", out / "run.json")
    error_line(result, *keywords)
    assert folder_listing(out) == []


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_user_error(case, tmp_path, out):
    args, keywords = EVAL_CASES[case](tmp_path)
    result = run_dsq("eval", *_with_data(args), "-q", "--json", out / "eval.json")
    error_line(result, *keywords)
    assert folder_listing(out) == []


def test_eval_without_data_is_a_usage_error(out):
    result = run_dsq("eval", need(RESNET20), "--json", out / "eval.json")
    assert "--data" in error_line(result, "missing option", usage=True)
    assert folder_listing(out) == []


# ---- option values click refuses (usage errors, exit 2) ----------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--bits", 0),
        ("--bits", 9),
        ("-b", 1),
        ("--block", 0),
        ("--block", -32),
        ("--act-bits", 1),
        ("--act-bits", 9),
        ("--act-block", 0),
        ("--rounds", -1),
        ("--limit", 0),
        ("--batch-size", 0),
        ("--bits", "four"),
        ("--method", "max"),
        ("--layout", "diagonal"),
    ],
)
def test_quantize_refuses_nonsense_option_values(option, value, out):
    result = run_dsq("quantize", need(RESNET20), option, value, "-o", out / "model.dsq", "--json", out / "r.json")
    line = error_line(result, str(value), usage=True)
    long_name = {"-b": "--bits"}.get(option, option)
    assert long_name in line, line
    assert folder_listing(out) == []


@pytest.mark.parametrize("option, value", [("--bits", 1), ("--bits", 9), ("--block", 0)])
def test_demo_refuses_nonsense_option_values(option, value, out):
    result = run_dsq("demo", option, value, "--json", out / "demo.json")
    assert option in error_line(result, str(value), usage=True)
    assert folder_listing(out) == []


# ---- output paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["-o", "--json"])
def test_output_at_an_existing_folder(option, out):
    (out / "model.dsq").mkdir()
    result = run_dsq("quantize", need(RESNET20), option, out / "model.dsq")
    error_line(result, "is a directory", "model.dsq", usage=True)
    assert folder_listing(out) == ["model.dsq"] and folder_listing(out / "model.dsq") == []


def test_eval_json_at_an_existing_folder(out, resnet20_run):
    result = run_dsq("eval", resnet20_run.model_file, "--data", need(CIFAR), "--json", out)
    error_line(result, "--json", "is a directory", usage=True)


def test_output_into_a_missing_folder(tmp_path, out):
    result = run_dsq(
        "quantize", need(RESNET20), "-q", "-o", tmp_path / "missing" / "model.dsq", "--json", out / "run.json"
    )
    error_line(result, "missing", "does not exist")
    assert folder_listing(out) == []


def test_output_into_a_missing_folder_writes_nothing_elsewhere(tmp_path, out):
    """What holds today: the error names the folder, and no file appears anywhere."""
    result = run_dsq("quantize", need(RESNET20), "-q", "-o", tmp_path / "missing" / "model.dsq")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot write {tmp_path / 'missing' / 'model.dsq'}: folder {tmp_path / 'missing'} does not exist"
    ]
    assert not (tmp_path / "missing").exists()


def test_json_into_a_missing_folder_leaves_no_model_file(tmp_path, out):
    result = run_dsq(
        "quantize", need(RESNET20), "-q", "-o", out / "model.dsq", "--json", tmp_path / "missing" / "run.json"
    )
    assert result.exit_code == 1
    assert folder_listing(out) == []
    error_line(result, "missing", "does not exist")


def test_failed_run_keeps_the_previous_output_file(tmp_path, out):
    """An error after quantization must not touch an existing -o/--json file (nothing is lost)."""
    (out / "model.dsq").write_bytes(b"previous model")
    (out / "run.json").write_text("{}\n")
    args, keywords = _twelve_classes(tmp_path)
    result = run_dsq("quantize", *args, "-q", "-o", out / "model.dsq", "--json", out / "run.json")
    error_line(result, *keywords)
    assert folder_listing(out) == ["model.dsq", "run.json"]
    assert (out / "model.dsq").read_bytes() == b"previous model" and (out / "run.json").read_text() == "{}\n"


# ---- quantized model files given where they do not belong -----------------------------------------


def _eval_of_a_damaged_dsq_file(resnet20_run, tmp_path, out, keep) -> str:
    data = resnet20_run.model_file.read_bytes()
    (tmp_path / "model.dsq").write_bytes(data[: keep(len(data))])
    result = run_dsq("eval", tmp_path / "model.dsq", "--data", need(CIFAR), "--json", out / "eval.json")
    line = error_line(result, "model.dsq")
    assert folder_listing(out) == []
    return line


def test_eval_of_a_truncated_dsq_file(resnet20_run, tmp_path, out):
    line = _eval_of_a_damaged_dsq_file(resnet20_run, tmp_path, out, keep=lambda size: size // 2)
    assert "truncated" in line and "--arch" not in line


def test_eval_of_a_dsq_file_cut_in_its_header(resnet20_run, tmp_path, out):
    line = _eval_of_a_damaged_dsq_file(resnet20_run, tmp_path, out, keep=lambda size: 1000)
    assert any(word in line for word in ("damaged", "truncated", "not a readable", "corrupt")), line
    assert "--arch" not in line


def test_quantize_of_a_dsq_file(resnet20_run, out):
    result = run_dsq("quantize", resnet20_run.model_file, "-o", out / "again.dsq")
    line = error_line(result, "model.dsq", "quantized")
    assert "--arch" not in line
    result = run_dsq("quantize", resnet20_run.model_file, "--arch", "cifar_resnet20", "-o", out / "again.dsq")
    line = error_line(result, "model.dsq", "quantized")
    assert "truncated" not in line
