"""`dsq quantize --target-bits` on the real ResNet-20: the policy printed, saved and replayed, and its errors."""

from __future__ import annotations

import json

import pytest

from dsq_cli_testkit import CIFAR, RESNET20, RESNET20_CONVS, error_line, need, run_dsq, table_rows

pytestmark = pytest.mark.realdata

FAST_CALIB = ["--calib", CIFAR, "--calib-images", "32", "--no-refit", "--adapt-steps", "0"]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    need(RESNET20), need(CIFAR)
    folder = tmp_path_factory.mktemp("budget")
    policy, report = folder / "policy.json", folder / "run.json"
    args = ["quantize", RESNET20, "--target-bits", "3", *FAST_CALIB, "--policy-out", policy, "--json", report]
    result = run_dsq(*args)
    assert result.exit_code == 0, result.output
    return result, json.loads(policy.read_text()), json.loads(report.read_text()), policy


def formats(policy: dict) -> dict[str, tuple[int, int]]:
    """{layer: (bits, block)} of a policy file: bits at the config's block 32, or a format."""
    return {name: (v, 32) if isinstance(v, int) else (v["bits"], v["block"]) for name, v in policy.items()}


def chosen(layers: list[dict]) -> dict[str, tuple[int, int]]:
    return {layer["name"]: (layer["bits"], layer["block"]) for layer in layers if layer["quantized"]}


def test_prints_the_policy_table_and_keeps_the_budget(budget_run):
    result, policy, report, _ = budget_run
    rows = table_rows(result.stdout, "layer")
    assert list(rows) == RESNET20_CONVS
    assert [cells[:3] for cells in rows.values()][0][0] == "conv"
    assert {name: (int(cells[2]), int(cells[3].split("/")[0])) for name, cells in rows.items()} == formats(policy)
    assert "bit budget: at most 3 bits per weight" in result.stdout
    assert report["quantization"]["mean_bits_per_weight"] <= 3.0
    assert report["bit_budget"]["layer_bits"] == policy
    assert chosen(report["quantization"]["layers"]) == formats(policy)
    assert len(set(formats(policy).values())) > 1  # mixed, not one format everywhere


def test_layer_bits_file_replays_the_policy(budget_run, tmp_path):
    _, policy, _, policy_file = budget_run
    result = run_dsq("quantize", RESNET20, "--layer-bits", policy_file, "-q", "--json", tmp_path / "replay.json")
    assert result.exit_code == 0, result.output
    replay = json.loads((tmp_path / "replay.json").read_text())["quantization"]["layers"]
    assert chosen(replay) == formats(policy)


@pytest.mark.parametrize(
    "extra, keywords",
    [
        ([], ["--calib", "--data"]),
        (["--bits", "3", *FAST_CALIB], ["--bits"]),
        (["--depthwise-bits", "4", *FAST_CALIB], ["--depthwise-bits"]),
    ],
)
def test_target_bits_errors(extra, keywords):
    need(RESNET20), need(CIFAR)
    error_line(run_dsq("quantize", RESNET20, "--target-bits", "3", *extra), *keywords)


def test_policy_out_needs_target_bits(tmp_path):
    need(RESNET20)
    error_line(run_dsq("quantize", RESNET20, "--policy-out", tmp_path / "p.json"), "--target-bits")


def test_an_unreachable_target_names_the_range():
    need(RESNET20), need(CIFAR)
    error_line(
        run_dsq("quantize", RESNET20, "--target-bits", "1.5", *FAST_CALIB, "-q"), "out of reach", "scales included"
    )


@pytest.mark.parametrize(
    "content, keywords",
    [
        ("not json", ["not a JSON file"]),
        ("[1, 2]", ["JSON object"]),
        ("{}", ["JSON object"]),
        ('{"conv1": 9}', ["'conv1'", "9"]),
        ('{"conv1": 4.5}', ["'conv1'", "4.5"]),
        ('{"conv1": {"bits": 3, "block": 0}}', ["'conv1'", "block", "0"]),
        ('{"conv1": {"bits": 3, "layout": "diagonal"}}', ["'diagonal'", "flat"]),
        ('{"conv1": {"bits": 3, "blocks": 256}}', ["'conv1'", "blocks"]),
    ],
)
def test_a_bad_policy_file_is_a_usage_error(tmp_path, content, keywords):
    need(RESNET20)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    error_line(run_dsq("quantize", RESNET20, "--layer-bits", bad), str(bad), *keywords, usage=True)
