"""ImageNet val in the four layouts users have, built from the 100 real dev images.

Every layout must give every image its right class (the index of its wnid among the 1000
sorted wnids), so EfficientNet-Lite0 scores the same top-1 on all four. The devkit's class IDs
are assigned in a shuffled order here, so a naive "ID - 1" label would be wrong.
"""

import functools
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner

from dsq.cli import cli
from dsq.data import open_dataset
from dsq.data.imagenet import DEVKIT, GROUND_TRUTH, META_MAT
from dsq.errors import DsqError

from conftest import IMAGENET_DEV, WNIDS, link, need, one_line

SYNSET_FIELDS = [
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
]
LAYOUTS = ["class folders", "kaggle", "devkit", "torchvision"]


class Val:
    """The dev images as ImageNet val: shuffled val numbers, shuffled devkit class IDs."""

    def __init__(self):
        self.wnids = need(WNIDS).read_text().split()
        files = sorted(need(IMAGENET_DEV).glob("*.JPEG"))
        rng = random.Random(2012)
        numbers = sorted(rng.sample(range(1, 50_001), len(files)))
        rng.shuffle(files)  # val numbers do not follow class order
        self.images = {n: f for n, f in zip(numbers, files)}  # val number -> real image
        self.id_of = dict(zip(rng.sample(self.wnids, len(self.wnids)), range(1, 1001)))  # wnid -> ILSVRC2012_ID

    def wnid(self, number: int) -> str:
        return self.images[number].name.split("_")[0]

    def name(self, number: int) -> str:
        return f"ILSVRC2012_val_{number:08d}.JPEG"

    def truth(self) -> dict[str, int]:
        """Real image path (links resolved, as `labels_by_image` keys: ../shared may be a link) -> its right label."""
        return {os.path.realpath(f): self.wnids.index(f.name.split("_")[0]) for f in self.images.values()}

    def flat(self, folder):
        for number, image in self.images.items():
            link(image, folder / self.name(number))
        return folder

    def class_folders(self, root):
        for number, image in self.images.items():
            link(image, root / self.wnid(number) / self.name(number))
        return root

    def kaggle(self, top):
        """Kaggle's download: LOC_val_solution.csv on top, images in ILSVRC/Data/CLS-LOC/val."""
        self.flat(top / "ILSVRC" / "Data" / "CLS-LOC" / "val")
        rows = [f"{self.name(n)[:-5]},{self.wnid(n)} 12 30 200 180 {self.wnid(n)} 1 2 3 4 " for n in self.images]
        rows.append("ILSVRC2012_val_00050001,n01440764 1 2 3 4 ")  # a row for an image not here
        (top / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
        return top

    @functools.cached_property
    def meta_mat(self) -> bytes:
        """The devkit's meta.mat: 1000 leaf synsets by ILSVRC2012_ID, then inner nodes."""
        by_id = sorted(self.id_of, key=self.id_of.get)
        inner = [("n99999990", [1, 2]), ("n99999991", [3])]
        synsets = np.zeros((len(by_id) + len(inner), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
        for i, wnid in enumerate(by_id):
            synsets[i, 0] = (float(i + 1), wnid, f"words {wnid}", "gloss", 0.0, np.zeros((1, 0)), 0.0, 1300.0)
        for j, (wnid, children) in enumerate(inner):
            synsets[len(by_id) + j, 0] = (
                float(1001 + j),
                wnid,
                "inner",
                "gloss",
                float(len(children)),
                np.array(children, dtype=float),
                1.0,
                0.0,
            )
        out = io.BytesIO()
        scipy.io.savemat(out, {"synsets": synsets})
        return out.getvalue()

    @functools.cached_property
    def ground_truth(self) -> bytes:
        """One ILSVRC2012_ID per line for all 50 000 val images (ours right, the others filler)."""
        lines = [self.id_of[self.wnid(n)] if n in self.images else 1 + n % 1000 for n in range(1, 50_001)]
        return "".join(f"{i}\n" for i in lines).encode()

    def devkit(self, folder):
        """Flat images, with the devkit's data/ files in ILSVRC2012_devkit_t12/data beside them."""
        self.flat(folder / "val")
        data = folder / DEVKIT / "data"
        data.mkdir(parents=True)
        (data / META_MAT).write_bytes(self.meta_mat)
        (data / GROUND_TRUTH).write_bytes(self.ground_truth)
        return folder / "val"

    def devkit_tar(self, path):
        with tarfile.open(path, "w:gz") as tar:
            for name, data in [(META_MAT, self.meta_mat), (GROUND_TRUTH, self.ground_truth)]:
                info = tarfile.TarInfo(f"{DEVKIT}/data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    def torchvision(self, root):
        """What torchvision.datasets.ImageNet leaves: meta.bin and val/<wnid>/ILSVRC2012_val_*.JPEG."""
        self.class_folders(root / "val")
        in_id_order = sorted(self.id_of, key=self.id_of.get)  # as torchvision reads meta.mat: not sorted
        torch.save(
            ({w: (f"name of {w}",) for w in in_id_order}, [self.wnid(n) for n in self.images]), root / "meta.bin"
        )
        return root


@pytest.fixture(scope="module")
def val():
    return Val()


@pytest.fixture(scope="module")
def layouts(val, tmp_path_factory):
    """Layout name -> (the path a user passes as --data, the class list it needs or None)."""
    tmp = tmp_path_factory.mktemp("layouts")
    return {
        "class folders": (val.class_folders(tmp / "folders"), str(WNIDS)),
        "kaggle": (val.kaggle(tmp / "imagenet-object-localization-challenge"), str(WNIDS)),
        "devkit": (val.devkit(tmp / "devkit"), None),
        "torchvision": (val.torchvision(tmp / "torchvision"), None),
    }


def labels_by_image(dataset) -> dict[str, int]:
    return {os.path.realpath(path): label for path, label in dataset.samples}


@pytest.mark.realdata
@pytest.mark.parametrize(
    "layout, words",
    [("class folders", "class folders"), ("kaggle", "Kaggle"), ("devkit", "devkit"), ("torchvision", "torchvision")],
)
def test_every_image_gets_its_class(val, layouts, layout, words):
    path, classes = layouts[layout]
    dataset = open_dataset(path, None, classes)
    assert labels_by_image(dataset) == val.truth()
    assert len(dataset.classes) == 1000 and words in dataset.describe()


@pytest.mark.realdata
def test_devkit_ids_are_not_labels(val, layouts):
    """The trap: the devkit's ILSVRC2012_ID - 1 would label almost every image wrongly."""
    dataset = open_dataset(layouts["devkit"][0], None)
    naive = {path: val.id_of[val.wnids[label]] - 1 for path, label in labels_by_image(dataset).items()}
    assert sum(naive[p] == right for p, right in val.truth().items()) <= 2
    assert "sorted wnids" in dataset.describe()


@pytest.mark.realdata
def test_kaggle_val_folder_and_csv_above(val, layouts):
    top = layouts["kaggle"][0]
    dataset = open_dataset(top / "ILSVRC" / "Data" / "CLS-LOC" / "val", None, WNIDS)
    assert labels_by_image(dataset) == val.truth()


@pytest.mark.realdata
def test_kaggle_needs_the_class_list(layouts):
    with pytest.raises(DsqError) as error:
        open_dataset(layouts["kaggle"][0], None)
    assert "--classes" in one_line(error) and "LOC_synset_mapping.txt" in one_line(error)


@pytest.mark.realdata
def test_kaggle_synset_mapping_gives_the_classes(val, layouts, tmp_path):
    top = tmp_path / "kaggle"
    val.kaggle(top)
    mapping = [f"{w} class {i}" for i, w in enumerate(val.wnids)]
    random.Random(0).shuffle(mapping)
    (top / "LOC_synset_mapping.txt").write_text("\n".join(mapping) + "\n")
    assert labels_by_image(open_dataset(top, None)) == val.truth()


@pytest.mark.realdata
def test_devkit_files_beside_the_images(val, tmp_path):
    folder = val.flat(tmp_path / "val")
    (folder / META_MAT).write_bytes(val.meta_mat)
    (folder / GROUND_TRUTH).write_bytes(val.ground_truth)
    assert labels_by_image(open_dataset(folder, None)) == val.truth()
    os.remove(folder / META_MAT)
    with pytest.raises(DsqError) as error:
        open_dataset(folder, None)
    assert "meta.mat" in one_line(error)


@pytest.mark.realdata
def test_devkit_tarball(val, tmp_path):
    folder = val.flat(tmp_path / "val")
    val.devkit_tar(tmp_path / f"{DEVKIT}.tar.gz")
    assert labels_by_image(open_dataset(folder, None)) == val.truth()


@pytest.mark.realdata
def test_torchvision_root_with_devkit_tarball_only(val, tmp_path):
    val.class_folders(tmp_path / "val")
    val.devkit_tar(tmp_path / f"{DEVKIT}.tar.gz")
    dataset = open_dataset(tmp_path, None)
    assert labels_by_image(dataset) == val.truth() and "torchvision" in dataset.describe()


@pytest.mark.realdata
def test_torchvision_reads_the_same_root(layouts):
    """The fixture is the real format: torchvision's own ImageNet class opens it (offline)."""
    from torchvision.datasets import ImageNet

    root = layouts["torchvision"][0]
    theirs = ImageNet(str(root), split="val")
    ours = open_dataset(root, None)
    assert {p: ours.classes[label] for p, label in ours.samples} == {p: theirs.wnids[t] for p, t in theirs.samples}


@pytest.mark.realdata
def test_class_list_overrides_the_metadata(val, layouts, tmp_path):
    listing = tmp_path / "reversed.txt"
    listing.write_text("\n".join(reversed(val.wnids)) + "\n")
    dataset = open_dataset(layouts["devkit"][0], None, listing)
    assert {p: 999 - label for p, label in labels_by_image(dataset).items()} == val.truth()


@pytest.mark.realdata
@pytest.mark.parametrize("files", [["IMG_0001.jpg", "holiday.png"], ["ILSVRC2012_val_00000001.JPEG"], []])
def test_unknown_layout_is_one_line_naming_the_layouts(tmp_path, files):
    for name in files:
        link(IMAGENET_DEV / "n01440764_tench.JPEG", tmp_path / name)
    with pytest.raises(DsqError) as error:
        open_dataset(tmp_path, None)
    message = one_line(error)
    assert message.startswith(f"found {len(files)} images in {tmp_path}")
    for layout in [
        "sub-folder per class",
        "<wnid>_",
        "LOC_val_solution.csv",
        GROUND_TRUTH,
        "meta.mat",
        "torchvision ImageNet root",
    ]:
        assert layout in message


@pytest.fixture(scope="module")
def lite0_top5():
    """Real image path -> EfficientNet-Lite0's top-5 classes (one forward pass per image, shared by all layouts)."""
    from dsq.data import get_preset
    from dsq.models import load_model

    dev = open_dataset(need(IMAGENET_DEV), get_preset("efficientnet_lite0").transform(), WNIDS)
    model = load_model("efficientnet_lite0").model
    with torch.inference_mode():
        images = torch.stack([image for image, _ in dev])
        top5 = torch.cat([model(batch).topk(5).indices for batch in images.split(50)])
    return {os.path.realpath(path): row.tolist() for (path, _), row in zip(dev.samples, top5)}


def scores(samples, top5) -> tuple[float, float]:
    hits1 = sum(top5[os.path.realpath(p)][0] == label for p, label in samples)
    hits5 = sum(label in top5[os.path.realpath(p)] for p, label in samples)
    return 100 * hits1 / len(samples), 100 * hits5 / len(samples)


@pytest.mark.realdata
def test_lite0_scores_the_same_on_all_four(layouts, lite0_top5):
    results = {
        name: scores(open_dataset(path, None, classes).samples, lite0_top5) for name, (path, classes) in layouts.items()
    }
    assert len(set(results.values())) == 1, results
    top1, top5 = results["devkit"]
    assert top1 >= 70 and top5 >= 90, results  # 75.1 % top-1 on the whole val set


@pytest.mark.realdata
def test_dsq_eval_names_the_layout_and_scores_the_same(layouts, lite0_top5, tmp_path):
    """End to end through `dsq eval` on the devkit layout (20 of its images)."""
    from dsq.evaluate import spread_indices

    path, _ = layouts["devkit"]
    args = ["eval", "efficientnet_lite0", "--data", path, "--limit", 20, "-j", 0, "-q", "--json", tmp_path / "r.json"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "data: 100 images, 1000 classes, ImageNet val, devkit layout" in result.stderr
    samples = open_dataset(path, None).samples
    expected = scores([samples[i] for i in spread_indices(100, 20)], lite0_top5)
    accuracy = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    assert (accuracy["top1"], accuracy["top5"], accuracy["images"]) == (*expected, 20)
