import pytest
import torch

from dsq.finite import all_finite

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_one_bad_number_anywhere_is_found(dtype, bad, where):
    t = torch.randn(1000).to(dtype)
    assert all_finite(t)
    t[where] = bad
    assert not all_finite(t)


def test_nan_beside_infinities_of_both_signs():
    assert not all_finite(torch.tensor([float("-inf"), float("nan"), float("inf")]))


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_extremes_of_a_dtype_are_finite(dtype):
    info = torch.finfo(dtype)
    assert all_finite(torch.tensor([info.min, -info.tiny, 0.0, info.tiny, info.max], dtype=dtype))


@pytest.mark.parametrize(
    "tensor",
    [torch.empty(0), torch.empty(3, 0), torch.tensor(2.0), torch.arange(5), torch.ones(3, dtype=torch.bool)],
    ids=["empty", "empty 2-d", "scalar", "integer", "bool"],
)
def test_tensors_without_floats_to_check(tensor):
    assert all_finite(tensor)


def test_views_are_checked_as_what_they_show():
    t = torch.randn(4, 6)
    t[1, 3] = float("nan")
    assert not all_finite(t.t()) and not all_finite(t[1:, 2:])
    assert all_finite(t[2:]) and all_finite(t[0].expand(5, 6))
