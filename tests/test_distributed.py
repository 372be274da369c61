"""`dsq eval` and `dsq sweep` under `torchrun --nproc-per-node 2` (gloo on CPU) give exactly one process's numbers."""

import json
import subprocess
import sys

import torch
from click.testing import CliRunner

from dsq import distributed
from dsq.cli import cli


def data_options(cifar) -> list[str]:
    """250 images in batches of 50: 5 batches, so the two processes get 3 and 2."""
    return ["--data", str(cifar), "--limit", "250", "--batch-size", "50", "-j", "0", "-q"]


def torchrun(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsq"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_eval_in_two_processes_equals_one(resnet20, cifar, tmp_path):
    one = CliRunner().invoke(cli, ["eval", str(resnet20), *data_options(cifar), "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    two = torchrun("eval", resnet20, *data_options(cifar), "--json", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["accuracy"] for n in ("one", "two"))
    assert (a["top1"], a["top5"], a["images"]) == (b["top1"], b["top5"], b["images"]) and b["images"] == 250
    assert two.stdout.count("float ") == 1 and two.stdout.count("wrote") == 1  # only the main process speaks
    assert two.stderr.count("data: ") == 1


def test_sweep_in_two_processes_equals_one(resnet20, cifar, tmp_path):
    grid = ["--bits", "3,4", "--block", "32", "--per-pass", "2"]
    one = CliRunner().invoke(cli, ["sweep", str(resnet20), *grid, *data_options(cifar), "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = torchrun("sweep", resnet20, *grid, *data_options(cifar), "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    pick = lambda data: [(p["bits"], p["top1"], p["top5"], p["images"]) for p in data["points"]]  # noqa: E731
    assert pick(a) == pick(b) and len(pick(a)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{e}" for n in ("one", "two") for e in ("csv", "json", "png")
    )


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(list(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.local_device("cuda") == torch.device("cuda")
    values = torch.tensor([1.0, 2.0])
    assert distributed.sum_over_processes(values) is values


def test_shards_and_gpus_of_torchrun_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.shard(list(range(5))) == [1, 3] and not distributed.is_main()
    assert distributed.local_device("cuda") == torch.device("cuda", 1)
    assert distributed.local_device("cuda:0") == torch.device("cuda", 0)
    assert distributed.local_device("cpu") == torch.device("cpu")
