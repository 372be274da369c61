"""What only a real `dsq` process shows: Ctrl-C at start-up and during the work, kill -9 during a
write, a full disk and a file-size limit, a read-only filesystem.

Each start of the installed command imports torch (seconds), so these cases are few.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import INSTALLED_DSQ as DSQ
from dsq_cli_testkit import CIFAR, RESNET20, error_line, folder_listing, need, run_dsq

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(*args) -> list[str]:
    if not DSQ.exists():
        pytest.skip(f"no installed dsq command at {DSQ}")
    return [str(DSQ), *map(str, args)]


def _start(*args, cwd: Path) -> subprocess.Popen:
    """The installed dsq, started with `args` in `cwd`."""
    return subprocess.Popen(
        _command(*args),
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )


def _interruptible() -> None:
    """Ctrl-C back to its default in the child: a test runner's worker (pytest-xdist) may ignore
    it, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    """The installed dsq run to its end with `args`."""
    return subprocess.run(_command(*args), capture_output=True, text=True, env=ENV, timeout=300, **kwargs)


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _importing_torch(process: subprocess.Popen) -> bool:
    """Whether the process has begun loading torch's libraries (it is inside `import torch`)."""
    maps = Path(f"/proc/{process.pid}/maps")
    return process.poll() is not None or "/torch/" in maps.read_text(errors="replace")


def _said_data(process: subprocess.Popen) -> bool:
    """Block until the command prints its 'data: ...' line: it has loaded the model and the data."""
    return process.stderr.readline().startswith("data: ") or process.poll() is not None


@pytest.mark.parametrize("moment", ["importing torch", "after 1 s", "evaluating"])
def test_ctrl_c_is_one_line_and_exit_130(moment, tmp_path):
    if moment == "importing torch" and not Path("/proc/self/maps").exists():
        pytest.skip("no /proc here")
    process = _start(
        "quantize",
        need(RESNET20),
        "--data",
        need(CIFAR),
        "-j",
        0,
        "-q",
        "-o",
        "model.dsq",
        "--json",
        "run.json",
        cwd=tmp_path,
    )
    if moment == "importing torch":
        _wait_until(lambda: _importing_torch(process))
    elif moment == "after 1 s":
        time.sleep(1)
    else:
        _wait_until(lambda: _said_data(process))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stdout + stderr, stderr
    assert process.returncode == 130, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == "Error: interrupted"
    assert folder_listing(tmp_path) == []  # no result, no partial or temporary file


def test_ctrl_c_while_the_commands_are_imported_waits_for_the_imports_then_exits_130():
    """A Ctrl-C inside the commands' imports is held until they end (an import it broke leaves a
    half-imported module that fails later with another error), then acted on."""
    from dsq.cli.interrupt import INTERRUPTED, held_interrupts

    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(SystemExit) as caught:
        with held_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)
    assert finished and caught.value.code == INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is before


def test_kill_9_during_a_write_leaves_a_temporary_file_the_next_write_removes(tmp_path):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from dsq.fileio import atomic_path\n"
                "with atomic_path(sys.argv[1]) as tmp:\n"
                "    open(tmp, 'w').write('half a result')\n"
                "    print('writing', flush=True)\n"
                "    time.sleep(600)\n"
            ),
            str(tmp_path / "out.json"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    [left] = folder_listing(tmp_path)
    assert left.startswith(".out.json.") and left.endswith(".tmp")

    from dsq.fileio import write_json

    write_json(tmp_path / "out.json", {"a": 1})
    assert folder_listing(tmp_path) == ["out.json"]


@pytest.fixture(scope="module")
def dsq_file(tmp_path_factory) -> Path:
    """A small quantized ResNet-20 (random weights) saved as a dsq file."""
    import dsq
    from dsq.models import build_model

    path = tmp_path_factory.mktemp("model") / "r20.dsq"
    dsq.save(path, *dsq.quantize(build_model("cifar_resnet20"), progress=False), arch="cifar_resnet20")
    return path


def _limit_file_size():
    """Writes past 4 KiB fail with EFBIG (Python ignores SIGXFSZ): the JSON and model files are larger."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 10, 4 << 10))


def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, dsq_file):
    result = _run("inspect", dsq_file, "--json", tmp_path / "out.json", preexec_fn=_limit_file_size)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: cannot write {tmp_path / 'out.json'}: File too large"]
    assert folder_listing(tmp_path) == []


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (root only; skipped where not allowed) with options; unmounted after."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(mount_tmpfs, dsq_file):
    disk = mount_tmpfs("disk", "size=16k")
    (disk / "filler").write_bytes(bytes(4096))
    result = _run("inspect", dsq_file, "--json", disk / "out.json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: cannot write {disk / 'out.json'}: No space left on device"]
    assert folder_listing(disk) == ["filler"]


def test_a_read_only_filesystem_is_refused_before_any_work(mount_tmpfs, monkeypatch):
    disk = mount_tmpfs("ro", "ro,size=16k")

    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing the output")

    monkeypatch.setattr("dsq.cli.quantize.load_model", no_work)
    result = run_dsq("quantize", need(RESNET20), "--data", need(CIFAR), "-o", disk / "m.dsq")
    assert error_line(result) == f"Error: cannot write {disk / 'm.dsq'}: Read-only file system"


def test_import_dsq_and_the_console_script_load_no_torch():
    """`import dsq` and `from dsq.cli import main` (all the console script does before calling
    main) are light: torch loads inside main, where Ctrl-C is handled; the public names load on
    first use."""
    code = (
        "import sys, dsq, dsq.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from dsq.artifact import load, save\n"
        "from dsq.convert import QuantReport\n"
        "assert (dsq.load, dsq.save, dsq.QuantReport) == (load, save, QuantReport)\n"
        "assert callable(dsq.quantize) and callable(dsq.calibrate) and issubclass(dsq.DsqError, ValueError)\n"
        "assert set(dsq.__all__) <= set(dir(dsq)) and dsq.cli.cli.name == 'cli'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=120)
