"""Output paths: no result ever overwrites an input or another result, every output is proved
writable before any work, failed writes are one line and leave nothing, written files follow the
umask, a killed writer's temporary files are cleaned up; and the inputs checked early.

Also: a dsq file saved from Python without preset or class count evaluates from the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dsq_cli_testkit import CIFAR, RESNET20, error_line, folder_listing, need, run_dsq

# ---- small inputs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized():
    """ResNet-20 (the published weights) quantized: (qmodel, report)."""
    import dsq
    from dsq.models import build_model

    model = build_model("cifar_resnet20")
    model.load_state_dict(_resnet20_state())
    return dsq.quantize(model, bits=4, block=32, progress=False)


@pytest.fixture(scope="module")
def dsq_file(quantized, tmp_path_factory) -> Path:
    """The quantized ResNet-20 saved as the README shows, `dsq.save(path, qmodel, report, arch=...)`:
    no preset and no class count in the file."""
    import dsq

    path = tmp_path_factory.mktemp("saved") / "r20.dsq"
    dsq.save(path, *quantized, arch="cifar_resnet20")
    return path


def _resnet20_state() -> dict:
    """The published ResNet-20 weights (state_dict under 'state_dict', 'module.' prefixes)."""
    import torch

    state = torch.load(need(RESNET20), map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("module."): value for key, value in state.items()}


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a float checkpoint, a dsq file, a two-class image folder and a class list."""
    shutil.copyfile(need(RESNET20), tmp_path / "resnet20-mine.th")
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), name == "cat" and "red" or "blue").save(tmp_path / "images" / name / "1.png")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


def _digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with the digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---- an output that is an input, or another output -------------------------------------------------

M = "resnet20-mine.th"
CLASSES = ("--classes", "classes.txt")

COLLISIONS = {  # command arguments (relative to the work folder), and the two names the error must give
    "quantize -o MODEL": (["quantize", M, "-o", M], [M]),
    "quantize --json MODEL": (["quantize", M, "--json", M], [M]),
    "quantize -o X --json X": (["quantize", M, "-o", "x.dsq", "--json", "x.dsq"], ["x.dsq"]),
    "quantize --json ./sub/../MODEL": (["quantize", M, "--json", f"./sub/../{M}"], [f"./sub/../{M}", M]),
    "quantize --json MODEL by absolute path": (["quantize", M, "--json", "{work}/" + M], [M]),
    "quantize -o SYMLINK-TO-MODEL": (["quantize", M, "-o", "link.th"], ["link.th", M]),
    "quantize -o HARD-LINK-OF-MODEL": (["quantize", M, "-o", "hard.th"], ["hard.th", M]),
    "quantize --json CLASSES": (
        ["quantize", M, "--data", "images", *CLASSES, "--json", "classes.txt"],
        ["classes.txt"],
    ),
    "quantize --json IMAGE-IN-DATA": (
        ["quantize", M, "--data", "images", "--json", "images/cat/1.png"],
        ["images/cat/1.png", "images"],
    ),
    "quantize -o NEW-FILE-IN-DATA": (["quantize", M, "--data", "images", "-o", "images/r.dsq"], ["images/r.dsq"]),
    "quantize --json IN-CALIB": (
        ["quantize", M, "--calib", "images", "--json", "images/dog/run.json"],
        ["images/dog/run.json", "images"],
    ),
    "eval --json DSQ": (["eval", "r20.dsq", "--data", "images", "--json", "r20.dsq"], ["r20.dsq"]),
    "eval --json MODEL": (["eval", M, "--data", "images", "--json", M], [M]),
    "eval --json CLASSES": (["eval", M, "--data", "images", *CLASSES, "--json", "classes.txt"], ["classes.txt"]),
    "inspect --json DSQ": (["inspect", "r20.dsq", "--json", "r20.dsq"], ["r20.dsq"]),
    "inspect --json SYMLINK-TO-DSQ": (["inspect", "r20.dsq", "--json", "dsq-link.json"], ["dsq-link.json", "r20.dsq"]),
}


@pytest.mark.parametrize("case", COLLISIONS)
def test_an_output_that_would_destroy_an_input_is_refused_before_any_work(case, work, dsq_file, monkeypatch):
    args, names = COLLISIONS[case]
    shutil.copyfile(dsq_file, work / "r20.dsq")
    (work / "link.th").symlink_to(M)
    (work / "dsq-link.json").symlink_to("r20.dsq")
    os.link(work / M, work / "hard.th")
    before = _digests(work)
    monkeypatch.chdir(work)
    line = error_line(run_dsq(*[a.format(work=work) for a in args]), *names)
    assert "same file" in line or "overwrite" in line or "inside" in line, line
    assert _digests(work) == before  # nothing changed, nothing added (no temporary file either)


@pytest.mark.parametrize("command", ["sweep", "sensitivity"])
def test_a_run_stem_whose_files_would_destroy_an_input_is_refused(command, work):
    """sweep/sensitivity -o STEM write STEM.json, STEM.csv and STEM.png: none may be an input."""
    shutil.copyfile(work / M, work / "weights.csv")
    before = _digests(work)
    result = run_dsq(
        command,
        work / "weights.csv",
        "--arch",
        "cifar_resnet20",
        "--data",
        work / "images",
        "-q",
        "-o",
        work / "weights",
    )
    error_line(result, "weights.csv", "overwrite")
    assert _digests(work) == before


def test_the_library_check_names_both_paths(tmp_path, one_line_dsq_error):
    from dsq.fileio import check_outputs

    (tmp_path / "in.th").write_bytes(b"weights")
    (tmp_path / "alias.th").symlink_to(tmp_path / "in.th")
    message = one_line_dsq_error(check_outputs, [tmp_path / "alias.th"], [tmp_path / "in.th"])
    assert "alias.th" in message and "in.th" in message
    check_outputs([tmp_path / "out.json", tmp_path / "out.dsq"], [tmp_path / "in.th"])  # distinct: fine
    assert (tmp_path / "in.th").read_bytes() == b"weights" and folder_listing(tmp_path) == ["alias.th", "in.th"]


# ---- proving an output writable before any work ------------------------------------------------------


def _no_work(*args, **kwargs):
    raise AssertionError("the command started its work before refusing the output")


@pytest.mark.parametrize("target", ["/proc/dsq-test.dsq", "/sys/dsq-test.dsq"])
def test_an_unwritable_place_is_refused_before_any_work(target, monkeypatch):
    if not Path(target).parent.is_dir():
        pytest.skip(f"no {Path(target).parent} here")
    monkeypatch.setattr("dsq.cli.quantize.load_model", _no_work)
    error_line(run_dsq("quantize", need(RESNET20), "-q", "-o", target), target)
    assert not Path(target).exists()


def _under_a_file(folder: Path) -> Path:
    (folder / "file").write_text("x")
    return folder / "file" / "out.json"


def _dangling_symlink(folder: Path) -> Path:
    (folder / "dangling.json").symlink_to(folder / "gone" / "out.json")
    return folder / "dangling.json"


def _read_only_file(folder: Path) -> Path:
    (folder / "ro.json").write_text("{}")
    (folder / "ro.json").chmod(0o444)
    return folder / "ro.json"


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.json")
    return folder / "pipe.json"


@pytest.mark.parametrize(
    "make, keywords",
    [
        (_fifo, ["pipe.json", "not a file"]),
        (_under_a_file, ["file", "not a folder"]),
        (_dangling_symlink, ["gone", "does not exist"]),
        (_read_only_file, ["ro.json", "read-only"]),
    ],
)
def test_check_writable_refuses(make, keywords, tmp_path, one_line_dsq_error):
    from dsq.fileio import check_writable, write_json

    target = make(tmp_path)
    before = _digests(tmp_path), folder_listing(tmp_path)
    for call in (check_writable, lambda path: write_json(path, {"a": 1})):
        message = one_line_dsq_error(call, target)
        assert all(k in message for k in keywords), message
    assert (_digests(tmp_path), folder_listing(tmp_path)) == before  # a pipe replaced by a file would show


def test_an_output_that_names_a_folder_to_be_is_refused(tmp_path, one_line_dsq_error):
    """'new/' names a folder, not a file called 'new'."""
    from dsq.fileio import check_writable

    assert "file name" in one_line_dsq_error(check_writable, f"{tmp_path}/new/")
    assert folder_listing(tmp_path) == []


def test_writing_through_a_symlink_writes_its_target(tmp_path):
    from dsq.fileio import write_json

    (tmp_path / "link.json").symlink_to("real.json")
    write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == '{\n  "a": 1\n}\n'


# ---- failed writes -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_a_failed_write_is_one_line_and_leaves_nothing(code, tmp_path, one_line_dsq_error):
    from dsq.fileio import atomic_path

    (tmp_path / "out.dsq").write_bytes(b"previous")

    def write():
        with atomic_path(tmp_path / "out.dsq") as tmp:
            Path(tmp).write_bytes(b"partial")
            raise OSError(code, os.strerror(code))

    message = one_line_dsq_error(write)
    assert "out.dsq" in message and os.strerror(code) in message
    assert folder_listing(tmp_path) == ["out.dsq"] and (tmp_path / "out.dsq").read_bytes() == b"previous"


def test_an_os_error_that_escapes_a_command_is_one_line(tmp_path, monkeypatch, dsq_file):
    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr("dsq.artifact.read_recipe", denied)
    error_line(run_dsq("inspect", dsq_file), "r20.dsq", "permission denied")


def test_ctrl_c_during_the_work_is_one_line_exit_130_and_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dsq.cli.quantize.quantize_and_evaluate", interrupted)
    result = run_dsq("quantize", need(RESNET20), "-q", "-o", tmp_path / "m.dsq", "--json", tmp_path / "m.json")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.strip() == "Error: interrupted"
    assert folder_listing(tmp_path) == []


# ---- the umask, and a killed writer's temporary files ----------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path, quantized):
    import dsq
    from dsq.fileio import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
        dsq.save(tmp_path / "out.dsq", *quantized, arch="cifar_resnet20")
    finally:
        os.umask(old)
    for name in ("out.json", "out.dsq"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name


def _dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_writers_temporary_files_are_removed_on_the_next_write(tmp_path):
    from dsq.fileio import write_json

    dead, live = f".out.json.{_dead_pid()}.0badf00d.tmp", f".out.json.{os.getpid()}.0cafe123.tmp"
    foreign = [".out.json.x1y2z3.tmp", ".other.json.1.0badf00d.tmp", "out.json.1.0badf00d.tmp"]
    for name in (dead, live, *foreign):
        (tmp_path / name).write_text("partial")
    write_json(tmp_path / "out.json", {"a": 1})
    assert folder_listing(tmp_path) == sorted([live, *foreign, "out.json"])


# ---- inputs checked before the model is loaded ------------------------------------------------------


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def _only_hidden_files(folder: Path) -> Path:
    (folder / "hidden").mkdir()
    (folder / "hidden" / ".DS_Store").write_text("")
    return folder / "hidden"


def _a_file(folder: Path) -> Path:
    (folder / "images.zip").write_bytes(b"PK")
    return folder / "images.zip"


@pytest.mark.parametrize(
    "make, keywords",
    [
        (lambda folder: folder / "missing", ["missing", "does not exist"]),
        (_empty_folder, ["empty", "--data"]),
        (_only_hidden_files, ["hidden", "empty"]),
        (_a_file, ["images.zip", "not a folder"]),
    ],
)
@pytest.mark.parametrize("model", ["float", "dsq"])
def test_eval_checks_data_before_loading_the_model(model, make, keywords, tmp_path, monkeypatch, dsq_file):
    monkeypatch.setattr("dsq.cli.evaluate.load_model", _no_work)
    monkeypatch.setattr("dsq.artifact.load", _no_work)
    source = need(RESNET20) if model == "float" else dsq_file
    error_line(run_dsq("eval", source, "--data", make(tmp_path), "-q"), *keywords)


# ---- a dsq file saved from Python ---------------------------------------------------------------------


def test_eval_of_a_dsq_file_saved_without_preset_or_classes(dsq_file, tmp_path):
    """The architecture's preset (cifar10: 32x32, no resize) and 10 classes are used."""
    import json

    from dsq.artifact import read_recipe

    recipe = read_recipe(dsq_file)
    assert recipe.get("preset") is None and recipe.get("num_classes") is None
    result = run_dsq(
        "eval", dsq_file, "--data", need(CIFAR), "--limit", 100, "-j", 0, "-q", "--json", tmp_path / "eval.json"
    )
    assert result.exit_code == 0, result.output
    accuracy = json.loads((tmp_path / "eval.json").read_text())["accuracy"]
    assert accuracy["images"] == 100 and accuracy["top1"] >= 80  # ResNet-20: 91.7 % float
