import pytest

from dsq.cli.options import SMALL_MACHINE, default_workers


@pytest.mark.parametrize("cores", range(1, SMALL_MACHINE + 1))
def test_small_machines_decode_in_a_thread(cores):
    assert default_workers(cores) == 0


@pytest.mark.parametrize(("cores", "workers"), [(SMALL_MACHINE + 1, SMALL_MACHINE + 1), (8, 8), (64, 8)])
def test_larger_machines_decode_in_up_to_8_processes(cores, workers):
    assert default_workers(cores) == workers
