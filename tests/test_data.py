import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from convnn.train.config import DataConfig, SubsetConfig
from convnn.train.data import (
    EpochShuffleSampler,
    ImageDataModule,
    SyntheticImages,
    build_dataset,
    build_transform,
    fixed_subset,
)

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _cifar_cfg(root, **kw):
    return DataConfig(name="cifar10", root=str(root), mean=MEAN, std=STD, num_workers=0, **kw)


def _image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=4, size=8) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:04d}.png")
    return root


def test_synthetic_items_are_deterministic_balanced_and_in_range():
    ds = SyntheticImages(20, num_classes=4, image_size=8, channels=3, seed=7)
    x, y = ds[5]
    assert x.shape == (3, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, SyntheticImages(20, 4, 8, 3, seed=7)[5][0])
    assert not torch.equal(x, SyntheticImages(20, 4, 8, 3, seed=8)[5][0])
    assert [ds[i][1] for i in range(20)].count(2) == 5
    with pytest.raises(IndexError):
        ds[20]


def test_transform_normalises_per_channel_like_the_paper():
    cfg = _cifar_cfg("unused", image_size=4)
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    out = build_transform(cfg, image_size=4, train=False)(Image.fromarray(pixels))
    expected = (
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]
    ) / (torch.tensor(STD)[:, None, None])
    torch.testing.assert_close(out, expected)


def test_transform_resizes_to_the_model_input_size_vit_224():
    cfg = _cifar_cfg("unused")
    out = build_transform(cfg, image_size=224, train=False)(Image.new("RGB", (32, 32), (255, 0, 0)))
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[0], torch.full((224, 224), (1 - MEAN[0]) / STD[0]))


def test_imagefolder_layout_is_detected_under_data_root(tmp_path):
    root = _image_folder(tmp_path / "cifar10")
    cfg = _cifar_cfg(root, num_classes=3, image_size=8)
    dm = ImageDataModule(cfg, image_size=8, batch_size=5, eval_batch_size=6)
    dm.prepare_data()
    dm.setup()
    assert dm.train_set.classes == ["cat", "dog", "frog"] and len(dm.test_set) == 12
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 6


def test_imagefolder_class_count_must_match_num_classes(tmp_path):
    cfg = _cifar_cfg(_image_folder(tmp_path), num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="has 3 class folders but data.num_classes=10"):
        build_dataset(cfg, train=True, image_size=8)


def test_torchvision_cifar_format_is_read(tmp_path, monkeypatch):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)  # no md5s for fakes
    cfg = _cifar_cfg(tmp_path / "cifar10", download=False)
    train = build_dataset(cfg, train=True, image_size=32)
    assert len(train) == 10 and train[1][1] == 7 and train[1][0].shape == (3, 32, 32)


def test_missing_cifar_offline_names_data_root(tmp_path):
    cfg = _cifar_cfg(tmp_path / "nowhere", download=False)
    dm = ImageDataModule(cfg, image_size=32, batch_size=4, eval_batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found under data.root='.*nowhere'"):
        dm.prepare_data()


def test_fixed_subset_is_seeded_and_bounded():
    ds = SyntheticImages(100, 10, 4, 3, seed=0)
    a, b = fixed_subset(ds, 10, seed=3, key="k"), fixed_subset(ds, 10, seed=3, key="k")
    assert a.indices == b.indices and a.indices == sorted(a.indices) and len(set(a.indices)) == 10
    assert fixed_subset(ds, 10, seed=4, key="k").indices != a.indices
    assert fixed_subset(ds, None, seed=3, key="k") is ds
    with pytest.raises(ValueError, match="data.subset.train=101 exceeds the 100 images"):
        fixed_subset(ds, 101, seed=0, key="data.subset.train")


def test_datamodule_applies_train_and_test_subsets():
    cfg = DataConfig(name="synthetic", train_size=64, test_size=32, subset=SubsetConfig(train=16, test=8))
    dm = ImageDataModule(cfg, image_size=32, batch_size=4, eval_batch_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (16, 8)


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochShuffleSampler(50, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == list(range(50)) and first != second
    again = EpochShuffleSampler(50, seed=1)
    again.set_epoch(1)
    assert list(again) == second


def test_an_empty_class_folder_is_named_with_its_split(tmp_path):
    root = _image_folder(tmp_path / "cifar10")
    for image in (root / "test" / "dog").iterdir():
        image.unlink()
    (root / "test" / "dog" / "notes.txt").write_text("no image")  # a file ImageFolder does not read
    cfg = _cifar_cfg(root, num_classes=3, image_size=8)
    build_dataset(cfg, train=True, image_size=8)  # the train split is whole
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(cfg, train=False, image_size=8)
    split = root / "test"
    assert str(e.value).startswith(
        f"cifar10: 1 class folder(s) of the test split '{split}' hold no image: ['{split / 'dog'}']"
    )


@pytest.mark.parametrize("present", ["train", "test"])
def test_an_imagefolder_copy_missing_a_split_names_it_and_never_downloads(tmp_path, monkeypatch, present):
    root = _image_folder(tmp_path / "cifar10")
    missing = {"train": "test", "test": "train"}[present]
    for path in sorted((root / missing).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / missing).rmdir()

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download torchvision's CIFAR files")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_download)
    dm = ImageDataModule(_cifar_cfg(root, num_classes=3, image_size=8), 8, batch_size=4, eval_batch_size=4)
    dm.prepare_data()  # an ImageFolder copy: nothing to download
    with pytest.raises(FileNotFoundError) as e:
        dm.setup()
    assert str(e.value).startswith(f"cifar10: the {missing} split folder '{root / missing}' is missing; ")
