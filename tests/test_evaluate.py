import multiprocessing
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from dsq.data import LabelledImages, get_preset, open_dataset
from dsq.errors import DsqError
from dsq.evaluate import Accuracy, evaluate, resolve_device, spread_indices


class Coded(Dataset):
    """Item i: an image whose every pixel is i, and its label."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), self.labels[i]


class Ranked(nn.Module):
    """Logits from a lookup: item i's classes ranked as `ranking(label_i)` (best first)."""

    def __init__(self, labels, classes, ranking):
        super().__init__()
        self.labels, self.classes, self.ranking = labels, classes, ranking
        self.seen = []

    def forward(self, x):
        ids = x[:, 0, 0, 0].long().tolist()
        self.seen += ids
        logits = torch.zeros(len(ids), self.classes)
        for row, i in enumerate(ids):
            for rank, c in enumerate(self.ranking(self.labels[i])):
                logits[row, c] = self.classes - rank
        return logits


def one_line(error):
    message = str(error.value)
    assert message and "\n" not in message, repr(message)
    return message


LABELS = [i % 10 for i in range(50)]


def test_exact_top1_top5():
    ds = Coded(LABELS)
    models = {
        "oracle": Ranked(LABELS, 10, lambda y: [y]),
        "second": Ranked(LABELS, 10, lambda y: [(y + 1) % 10, y]),  # top-5 but never top-1
        "sixth": Ranked(LABELS, 10, lambda y: [(y + k) % 10 for k in range(1, 6)] + [y]),
        "always3": Ranked(LABELS, 10, lambda y: [3, 1, 4, 5, 9, 2]),
    }
    result = evaluate(models, ds, batch_size=7, progress=False)
    assert list(result) == list(models)
    assert (result["oracle"].top1, result["oracle"].top5) == (100.0, 100.0)
    assert (result["second"].top1, result["second"].top5) == (0.0, 100.0)
    assert (result["sixth"].top1, result["sixth"].top5) == (0.0, 0.0)
    assert (result["always3"].top1, result["always3"].top5) == (10.0, 50.0)
    assert all(a.images == 50 and a.seconds >= 0 for a in result.values())
    # the first model is the reference: "always3" predicts what the oracle does for the 5 images labelled 3
    assert [a.agreement for a in result.values()] == [100.0, 0.0, 0.0, 10.0]
    assert result["oracle"].to_dict() == {
        "top1": 100.0,
        "top5": 100.0,
        "images": 50,
        "seconds": result["oracle"].seconds,
    }


def test_every_model_sees_the_same_images_once():
    ds = Coded(LABELS)
    a, b = Ranked(LABELS, 10, lambda y: [y]), Ranked(LABELS, 10, lambda y: [0])
    evaluate({"float": a, "quantized": b}, ds, batch_size=8, progress=False)
    assert a.seen == b.seen == list(range(50))


def test_fewer_than_five_classes():
    labels = [0, 1, 2, 1]
    result = evaluate({"m": Ranked(labels, 3, lambda y: [2, 0, 1])}, Coded(labels), progress=False)
    assert result["m"].top1 == 25.0 and result["m"].top5 == 100.0


def test_limit_spreads_over_dataset():
    assert spread_indices(10_000, 10) == [0, 1111, 2222, 3333, 4444, 5555, 6666, 7777, 8888, 9999]
    assert spread_indices(5, None) == spread_indices(5, 5) == spread_indices(5, 99) == [0, 1, 2, 3, 4]
    assert spread_indices(7, 1) == [0]
    for size, limit in [(10, 9), (1000, 999), (101, 37)]:
        picked = spread_indices(size, limit)
        assert len(picked) == limit and picked == sorted(set(picked)) and picked[-1] == size - 1
    labels = [i // 100 for i in range(1000)]  # class folders: 100 of each class, in order
    model = Ranked(labels, 10, lambda y: [y])
    result = evaluate({"m": model}, Coded(labels), limit=20, progress=False)
    assert result["m"].images == 20 and model.seen == spread_indices(1000, 20)
    assert sorted({labels[i] for i in model.seen}) == list(range(10))  # not just the first class


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(DsqError) as error:
        evaluate({"m": nn.Identity()}, Coded([0]), limit=limit, progress=False)
    assert "limit" in one_line(error)


def test_empty_dataset():
    with pytest.raises(DsqError) as error:
        evaluate({"m": nn.Identity()}, Coded([]), progress=False)
    assert "empty" in one_line(error)


def test_unavailable_device():
    with pytest.raises(DsqError) as error:
        resolve_device("nonsense")
    assert "--device cpu" in one_line(error)
    if not torch.cuda.is_available():
        with pytest.raises(DsqError) as error:
            evaluate({"m": nn.Identity()}, Coded([0]), device="cuda", progress=False)
        assert "'cuda'" in one_line(error)


def test_mode_restored_and_inference_mode():
    class Probe(nn.Module):
        def forward(self, x):
            assert not self.training and torch.is_inference_mode_enabled()
            return torch.zeros(len(x), 10)

    probe = Probe().train()
    evaluate({"m": probe}, Coded(LABELS), progress=False)
    assert probe.training


def test_models_run_side_by_side_on_the_cpu_threads():
    """With 2 CPU threads, two models run at once with one thread each, in inference mode; the
    caller's thread count is restored."""

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.threads = set()

        def forward(self, x):
            assert torch.is_inference_mode_enabled()
            self.threads.add(torch.get_num_threads())
            return torch.zeros(len(x), 10)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probes = {"a": Probe(), "b": Probe(), "c": Probe()}
        evaluate(probes, Coded(LABELS), batch_size=10, progress=False)
        assert torch.get_num_threads() == 2
        assert all(p.threads == {1} for p in probes.values())
        lone = Probe()
        evaluate({"lone": lone}, Coded(LABELS), progress=False)
        assert lone.threads == {2}
    finally:
        torch.set_num_threads(before)


def test_label_beyond_outputs():
    with pytest.raises(DsqError) as error:
        evaluate({"m": Ranked([0, 7], 5, lambda y: [0])}, Coded([0, 7]), progress=False)
    assert "label 7" in one_line(error) and "5 classes" in one_line(error)


def test_bad_output_shape():
    with pytest.raises(DsqError) as error:
        evaluate({"m": nn.Identity()}, Coded([0, 1]), progress=False)
    assert "(2, 1, 2, 2)" in one_line(error)


def test_mixed_image_sizes_explained(tmp_path):
    from PIL import Image

    for name, size in [("a.png", (8, 8)), ("b.png", (9, 9))]:
        Image.new("RGB", size).save(tmp_path / name)
    ds = LabelledImages(
        [(str(tmp_path / "a.png"), 0), (str(tmp_path / "b.png"), 0)],
        ["x"],
        get_preset("cifar10").transform(),
        source=str(tmp_path),
        layout="test",
    )
    with pytest.raises(DsqError) as error:
        evaluate({"m": nn.Flatten()}, ds, progress=False)
    assert "--resize" in one_line(error)


def test_worker_error_stays_one_line(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    ds = LabelledImages(
        [(str(tmp_path / "bad.jpg"), 0)], ["x"], get_preset("cifar10").transform(), source=str(tmp_path), layout="test"
    )
    with pytest.raises(DsqError) as error:
        evaluate({"m": nn.Flatten()}, ds, workers=1, progress=False)
    assert one_line(error).startswith(f"cannot read image {tmp_path / 'bad.jpg'}")
    assert not multiprocessing.active_children()  # the worker was stopped, not left for a late gc


def png_images(folder, count, bad=None):
    """LabelledImages of `count` 4x4 PNGs in `folder`, image `bad` an undecodable file."""
    from PIL import Image

    for i in range(count):
        path = folder / f"{i:03d}.png"
        if i == bad:
            path.write_bytes(b"garbage")
        else:
            Image.new("RGB", (4, 4), (i, i, i)).save(path)
    samples = [(str(folder / f"{i:03d}.png"), 0) for i in range(count)]
    return LabelledImages(samples, ["x"], get_preset("cifar10").transform(), source=str(folder), layout="test")


class Counting(nn.Module):
    """Counts the images it sees; raises `error` on batch `fail_at` (0-based) when given."""

    def __init__(self, fail_at=None, error=None):
        super().__init__()
        self.seen, self.batches, self.fail_at, self.error = 0, 0, fail_at, error

    def forward(self, x):
        if self.batches == self.fail_at:
            raise self.error
        self.seen += len(x)
        self.batches += 1
        return torch.zeros(len(x), 2)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "dsq-prefetch"]


def test_a_loading_failure_in_the_prefetching_thread_stays_one_line(tmp_path):
    """Without workers a thread loads the next batch: a failure there reaches the caller as one line,
    in its place (the batches before it were evaluated), and the thread is gone."""
    model = Counting()
    with pytest.raises(DsqError) as error:
        evaluate({"m": model}, png_images(tmp_path, 30, bad=20), batch_size=8, workers=0, progress=False)
    assert one_line(error).startswith(f"cannot read image {tmp_path / '020.png'}")
    assert model.seen == 16 and not prefetch_threads()


def test_a_model_failure_stops_the_prefetching_thread(tmp_path):
    model = Counting(fail_at=1, error=RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(DsqError, match="out of memory running model 'm'"):
        evaluate({"m": model}, png_images(tmp_path, 30), batch_size=8, workers=0, progress=False)
    assert model.seen == 8 and not prefetch_threads()


def test_progress_bar(capsys):
    evaluate({"float": Ranked(LABELS, 10, lambda y: [y])}, Coded(LABELS), batch_size=25, progress=True)
    err = capsys.readouterr().err
    assert "50/50" in err and "float=100.00%" in err


def test_real_cifar_subset_with_constant_model(cifar):
    ds = open_dataset(cifar, get_preset("cifar10").transform())

    class Always(nn.Module):
        def forward(self, x):
            assert x.shape[1:] == (3, 32, 32)
            return torch.arange(10.0).flip(0).repeat(len(x), 1)  # ranks 0, 1, 2, 3, 4 first

    result = evaluate({"m": Always()}, ds, limit=100, batch_size=32, progress=False)["m"]
    picked = [ds.targets[i] for i in spread_indices(len(ds), 100)]
    assert result.images == 100
    assert result.top1 == picked.count(0) and result.top5 == sum(label < 5 for label in picked)
    assert 5 <= picked.count(0) <= 15  # spread: every class about 10 %


def test_accuracy_is_plain_data():
    assert Accuracy(1.0, 2.0, 3, 0.5, 90.0).to_dict() == {"top1": 1.0, "top5": 2.0, "images": 3, "seconds": 0.5}


def test_every_device_matches_cpu(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    ds = Coded(LABELS)
    cpu = evaluate({"m": model}, ds, progress=False)["m"]
    other = evaluate({"m": model}, ds, device=device, progress=False)["m"]
    assert next(model.parameters()).device.type == device
    assert (other.top1, other.top5, other.images) == (cpu.top1, cpu.top5, cpu.images)
