import pytest
import torch
from PIL import Image

from dsq.data import ClassFolderDataset, LabelledImages, get_preset, open_dataset, read_classes
from dsq.data.samples import CIFAR10_CLASSES
from dsq.errors import DsqError

from conftest import CIFAR, IMAGENET_DEV, WNIDS, link, need, one_line


@pytest.fixture(scope="module")
def cifar():
    return ClassFolderDataset(need(CIFAR), get_preset("cifar10").transform())


@pytest.fixture
def tiny(tmp_path):
    """cat/ and dog/ with real CIFAR images, plus noise that must be skipped."""
    need(CIFAR)
    link(CIFAR / "dog" / "0012.jpg", tmp_path / "dog" / "b.JPG")
    link(CIFAR / "dog" / "0024.jpg", tmp_path / "dog" / "a.jpeg")
    link(CIFAR / "cat" / "0003.jpg", tmp_path / "cat" / "sub" / "x.PNG.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "._x.jpg").write_bytes(b"AppleDouble")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README").write_text("ignored")
    return tmp_path


@pytest.mark.realdata
def test_cifar10_test_folder(cifar):
    assert cifar.classes == list(CIFAR10_CLASSES)
    assert len(cifar) == 10_000
    assert torch.bincount(torch.tensor(cifar.targets)).tolist() == [1000] * 10
    assert dict(cifar.samples)[str(CIFAR / "cat" / "0003.jpg")] == 3
    assert cifar.samples[0] == (str(CIFAR / "airplane" / "0000.jpg"), 0)
    assert cifar.samples == sorted(cifar.samples, key=lambda s: (s[1], s[0]))  # sorted, deterministic
    image, label = cifar[3003]
    assert label == 3 and image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert "10000 images, 10 classes" in cifar.describe()


@pytest.mark.realdata
def test_small_layout(tiny):
    ds = ClassFolderDataset(tiny, None)
    assert ds.classes == ["cat", "dog"]
    assert [(p.rsplit("/", 1)[1], label) for p, label in ds.samples] == [("x.PNG.jpg", 0), ("a.jpeg", 1), ("b.JPG", 1)]
    image, label = ds[1]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 1


@pytest.mark.realdata
def test_class_list_as_list_and_file(tiny, tmp_path_factory):
    ds = ClassFolderDataset(tiny, None, classes=list(CIFAR10_CLASSES))
    assert ds.classes == list(CIFAR10_CLASSES) and ds.targets == [3, 5, 5]
    listing = tmp_path_factory.mktemp("lists") / "classes.txt"
    listing.write_text("\ufeffdog\ncat\n\n")  # BOM and trailing blank lines are tolerated
    assert ClassFolderDataset(tiny, None, classes=listing).targets == [1, 0, 0]


@pytest.mark.realdata
def test_folder_not_in_class_list(tiny):
    with pytest.raises(DsqError) as error:
        ClassFolderDataset(tiny, None, classes=["cat", "bird"])
    assert "'dog'" in one_line(error) and "not in the class list" in one_line(error)


def test_grayscale_and_palette_converted_to_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 6), 7).save(tmp_path / "a" / "g.png")
    Image.new("P", (8, 6)).save(tmp_path / "a" / "p.bmp")
    images = [image for image, _ in ClassFolderDataset(tmp_path, None)]
    assert [im.mode for im in images] == ["RGB", "RGB"]


def wnid_layout(tmp_path, wnids):
    image = need(IMAGENET_DEV) / "n01440764_tench.JPEG"
    for wnid in wnids:
        link(image, tmp_path / wnid / "img.JPEG")
    return tmp_path


@pytest.mark.realdata
def test_wnid_folders_need_class_list(tmp_path):
    root = wnid_layout(tmp_path, ["n01440764", "n01443537"])
    with pytest.raises(DsqError) as error:
        ClassFolderDataset(root, None)
    assert "--classes" in one_line(error) and "1000" in one_line(error)
    ds = ClassFolderDataset(root, None, classes=need(WNIDS))
    wnids = WNIDS.read_text().split()
    assert len(ds.classes) == 1000 and ds.targets == [0, wnids.index("n01443537")] == [0, 1]
    ds2 = open_dataset(root, None, classes=str(WNIDS))
    assert ds2.samples == ds.samples


@pytest.mark.realdata
def test_flat_wnid_named_folder():
    ds = open_dataset(need(IMAGENET_DEV), get_preset("imagenet").transform(), classes=need(WNIDS))
    wnids = WNIDS.read_text().split()
    assert len(ds) == 100 and ds.layout == "wnid-named files"
    assert ds.targets == list(range(0, 1000, 10))  # one image of every 10th class
    assert all(wnids[label] in path for path, label in ds.samples)
    assert ds[0][0].shape == (3, 224, 224)
    with pytest.raises(DsqError) as error:
        open_dataset(IMAGENET_DEV, None)
    assert "--classes" in one_line(error)


def test_read_classes_synset_words_style(tmp_path):
    path = tmp_path / "synset_words.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert read_classes(path) == ["n01440764", "n01443537"]


@pytest.mark.parametrize("text, words", [("a\n\nb\n", "line 2"), ("a\nb\na\n", "twice"), ("", "empty")])
def test_bad_class_list(tmp_path, text, words):
    (tmp_path / "c" / "x").mkdir(parents=True)
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(DsqError) as error:
        ClassFolderDataset(tmp_path / "c", None, classes=path)
    assert words in one_line(error)


def test_missing_class_list(tmp_path):
    with pytest.raises(DsqError) as error:
        read_classes(tmp_path / "nope.txt")
    assert "does not exist" in one_line(error)


def test_missing_path(tmp_path):
    with pytest.raises(DsqError) as error:
        ClassFolderDataset(tmp_path / "missing", None)
    assert "does not exist" in one_line(error) and "missing" in one_line(error)


def test_path_is_a_file(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    for opener in (ClassFolderDataset, open_dataset):
        with pytest.raises(DsqError) as error:
            opener(tmp_path / "f.jpg", None)
        assert "is a file, not a folder" in one_line(error)


@pytest.mark.parametrize("make", ["nothing", "empty class folders", "no images inside"])
def test_no_images(tmp_path, make):
    if make != "nothing":
        (tmp_path / "cat").mkdir()
        (tmp_path / "dog").mkdir()
    if make == "no images inside":
        (tmp_path / "cat" / "notes.txt").write_text("x")
    for opener in (ClassFolderDataset, open_dataset):
        with pytest.raises(DsqError) as error:
            opener(tmp_path, None)
        if make == "nothing" and opener is open_dataset:  # no layout at all: the layouts dsq reads are listed
            assert one_line(error).startswith(f"found 0 images in {tmp_path} but no class sub-folders")
            assert "one sub-folder per class with images inside" in one_line(error)
        else:
            expected = f"found 0 images in {tmp_path}: expected one sub-folder per class with images inside"
            assert one_line(error) == expected


@pytest.mark.realdata
def test_flat_unlabelled_folder_explained(tmp_path):
    link(need(CIFAR) / "cat" / "0003.jpg", tmp_path / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DsqError) as error:
        open_dataset(tmp_path, None)
    assert "no class sub-folders" in one_line(error) and "ImageNet val" in one_line(error)


@pytest.mark.parametrize("content", [b"", b"not a jpeg at all", pytest.param(None, marks=pytest.mark.realdata)])
def test_corrupt_image_names_file(tmp_path, content):
    path = tmp_path / "cat" / "broken.jpg"
    path.parent.mkdir()
    if content is None:  # a real JPEG cut in half
        content = (need(CIFAR) / "cat" / "0003.jpg").read_bytes()[:300]
    path.write_bytes(content)
    ds = ClassFolderDataset(tmp_path, get_preset("cifar10").transform())  # listing does not decode
    with pytest.raises(DsqError) as error:
        ds[0]
    assert str(path) in one_line(error) and one_line(error).startswith("cannot read image")


def test_labelled_images_is_the_common_type(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.webp").write_bytes(b"")
    assert isinstance(ClassFolderDataset(tmp_path, None), LabelledImages)
