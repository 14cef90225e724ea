"""Behaviour of the data layer: the embedded ``synthetic`` dataset, its cache, augmentation, factory."""

import os
import pickle
import threading

import numpy as np
import pytest
import torch

from harness.data import DATASETS, build_dataset
from harness.data import synthetic
from harness.data.transforms import SegTransform

K = 9
IGNORE = 255
AUG = {"crop_size": [64, 80], "scale_range": [0.5, 2.0], "flip": True}


def make_cfg(**overrides):
    cfg = dict(synthetic.DEFAULT_CONFIG)
    cfg["sizes"] = {"train": 32, "tune": 32, "val": 32}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def sample100():
    """100 training images, evaluation mode."""
    return build_dataset(make_cfg(sizes={"train": 100}), "train")


def digests(ds):
    return {ds.raw(i)[0].tobytes() for i in range(len(ds))}


# --- the generator ------------------------------------------------------------------------------


def test_same_seed_split_index_gives_identical_image_and_mask():
    a = synthetic.render(3, "train", 7, 96, 96)
    b = synthetic.render(3, "train", 7, 96, 96)
    assert a[0].dtype == np.uint8 and a[0].shape == (96, 96, 3) and a[1].shape == (96, 96)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_different_index_seed_or_split_gives_different_images():
    base = synthetic.render(0, "train", 0, 96, 96)[0]
    for other in [(0, "train", 1), (1, "train", 0), (0, "val", 0), (0, "tune", 0)]:
        assert not np.array_equal(base, synthetic.render(*other, 96, 96)[0]), other


def test_other_image_sizes_render():
    image, mask = synthetic.render(0, "val", 0, 48, 80)
    assert image.shape == (48, 80, 3) and mask.shape == (48, 80)


def test_train_tune_val_are_disjoint():
    cfg = make_cfg()
    splits = {s: digests(build_dataset(cfg, s)) for s in ("train", "tune", "val")}
    assert all(len(d) == 32 for d in splits.values())  # no duplicates inside a split either
    assert not splits["train"] & splits["tune"]
    assert not splits["train"] & splits["val"]
    assert not splits["tune"] & splits["val"]


def test_class_frequencies_are_long_tailed_and_complete(sample100):
    freq = sample100.class_frequencies()
    assert freq.shape == (K,) and freq.sum() == pytest.approx(1.0)
    assert (freq > 0.10).sum() >= 3, freq
    assert (freq < 0.03).sum() >= 3, freq
    assert (freq > 0).all(), freq
    rare = freq < 0.03
    assert freq[rare].max() < 0.03 and freq[rare].min() < 0.01, freq


def test_ignore_pixels_present_but_rare(sample100):
    masks = np.stack([sample100.raw(i)[1] for i in range(len(sample100))])
    fraction = (masks == IGNORE).mean()
    assert 0 < fraction < 0.03
    assert set(np.unique(masks)) <= set(range(K)) | {IGNORE}


# --- dataset items and transforms -----------------------------------------------------------------


def test_dataset_attributes():
    ds = build_dataset(make_cfg(), "val")
    assert len(ds) == 32 and ds.split == "val"
    assert ds.num_classes == K and ds.ignore_index == IGNORE
    assert ds.class_names == list(synthetic.CLASS_NAMES) and len(ds.class_names) == K
    assert len(ds.palette) == K and all(len(rgb) == 3 for rgb in ds.palette)
    assert "synthetic" in DATASETS


def test_eval_item_is_normalised_full_image():
    cfg = make_cfg()
    ds = build_dataset(cfg, "val")
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert mask.dtype == torch.int64 and mask.shape == (96, 96)
    raw_image, raw_mask = ds.raw(0)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(raw_image.copy()).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(image, expected)
    np.testing.assert_array_equal(mask.numpy(), raw_mask)


def test_augmented_items_have_crop_shape_and_valid_labels():
    ds = build_dataset(make_cfg(), "train", augment=AUG)
    torch.manual_seed(0)
    for i in range(8):
        image, mask = ds[i]
        assert image.shape == (3, 64, 80) and image.dtype == torch.float32
        assert mask.shape == (64, 80) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= set(range(K)) | {IGNORE}


def test_padding_uses_ignore_in_mask_and_zero_in_image():
    ds = build_dataset(make_cfg(), "train", augment={"crop_size": [96, 96], "scale_range": [0.5, 0.5], "flip": False})
    image, mask = ds[0]  # scaled to 48 x 48, padded bottom/right to 96 x 96
    assert (mask[48:, :] == IGNORE).all() and (mask[:, 48:] == IGNORE).all()
    assert (image[:, 48:, :] == 0).all() and (image[:, :, 48:] == 0).all()
    assert (mask[:48, :48] != IGNORE).float().mean() > 0.9


def test_scaling_keeps_the_label_layout():
    ds = build_dataset(make_cfg(), "train", augment={"crop_size": [192, 192], "scale_range": [2.0, 2.0], "flip": False})
    _, mask = ds[0]
    np.testing.assert_array_equal(mask[::2, ::2].numpy(), ds.raw(0)[1])  # nearest at 2x: exact


def test_flip_and_crop_are_reproducible_with_a_seeded_generator():
    ds = build_dataset(make_cfg(), "train", augment={"crop_size": [96, 96], "scale_range": [1.0, 1.0], "flip": True})
    plain_image, plain_mask = build_dataset(make_cfg(), "train")[3]

    def draws(seed):
        ds.generator = torch.Generator().manual_seed(seed)
        return [ds[3] for _ in range(16)]

    first, again = draws(1), draws(1)
    flipped = []
    for (img, msk), (img2, msk2) in zip(first, again):
        assert torch.equal(img, img2) and torch.equal(msk, msk2)
        if torch.equal(msk, plain_mask):
            assert torch.equal(img, plain_image)
            flipped.append(False)
        else:
            assert torch.equal(msk, plain_mask.flip(-1)) and torch.equal(img, plain_image.flip(-1))
            flipped.append(True)
    assert any(flipped) and not all(flipped)
    other = draws(2)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_transform_uses_torch_global_rng_when_no_generator():
    transform = SegTransform([0, 0, 0], [1, 1, 1], IGNORE, AUG)
    image, mask = synthetic.render(0, "train", 0, 96, 96)
    torch.manual_seed(5)
    a = transform(image, mask)
    torch.manual_seed(5)
    b = transform(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_other_ignore_index_is_applied_to_masks_and_padding():
    ds = build_dataset(
        make_cfg(ignore_index=-1), "train", augment={"crop_size": [96, 96], "scale_range": [0.5, 0.5], "flip": False}
    )
    values = set()
    for i in range(len(ds)):
        values |= set(ds[i][1].unique().tolist())
    assert -1 in values and IGNORE not in values
    assert ds.ignore_index == -1


def test_bad_augment_config_is_rejected():
    with pytest.raises(ValueError, match="crop_size"):
        build_dataset(make_cfg(), "train", augment={"crop_size": [0, 64]})
    with pytest.raises(ValueError, match="unknown augment keys"):
        build_dataset(make_cfg(), "train", augment={"crop_size": [64, 64], "rotate": 10})


# --- cache ----------------------------------------------------------------------------------------


def test_cache_is_written_atomically_and_reloaded_identically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        assert not os.path.exists(dst)  # the final name only ever appears complete
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    cfg = make_cfg(sizes={"train": 8})
    first = build_dataset(cfg, "train", cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert sorted(replaced) == files and len(files) == 2  # images and masks, nothing left over
    assert all(f.startswith("synthetic-") and "-train" in f and f.endswith(".npy") for f in files)

    def no_generation(*args, **kwargs):
        raise AssertionError("the split should have been read from the cache")

    monkeypatch.setattr(synthetic, "render_split", no_generation)
    second = build_dataset(cfg, "train", cache_dir=str(tmp_path))
    in_memory = [synthetic.render(0, "train", i, 96, 96) for i in range(8)]
    for i in range(8):
        for a, b, c in zip(first.raw(i), second.raw(i), in_memory[i]):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
        assert torch.equal(first[i][0], second[i][0])


def test_cache_key_covers_every_generation_parameter(tmp_path, monkeypatch):
    def files_for(cfg, split="train"):
        before = set(os.listdir(tmp_path))
        build_dataset(cfg, split, cache_dir=str(tmp_path))
        return set(os.listdir(tmp_path)) - before

    assert len(files_for(make_cfg(sizes={"train": 4, "val": 4}))) == 2
    assert len(files_for(make_cfg(sizes={"train": 4, "val": 4}))) == 0  # reused
    assert len(files_for(make_cfg(sizes={"train": 4, "val": 4}), "val")) == 2
    assert len(files_for(make_cfg(sizes={"train": 5}))) == 2
    assert len(files_for(make_cfg(sizes={"train": 4}, seed=1))) == 2
    assert len(files_for(make_cfg(sizes={"train": 4}, image_size=[64, 96]))) == 2
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert len(files_for(make_cfg(sizes={"train": 4}))) == 2


def test_corrupt_cache_is_regenerated(tmp_path):
    cfg = make_cfg(sizes={"train": 4})
    good = build_dataset(cfg, "train", cache_dir=str(tmp_path))
    reference = [good.raw(i) for i in range(4)]
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_bytes(b"truncated")
    again = build_dataset(cfg, "train", cache_dir=str(tmp_path))
    for i in range(4):
        np.testing.assert_array_equal(again.raw(i)[0], reference[i][0])
        np.testing.assert_array_equal(again.raw(i)[1], reference[i][1])


def test_concurrent_builders_share_one_consistent_cache(tmp_path):
    cfg = make_cfg(sizes={"tune": 6})
    results, errors = [], []

    def build():
        try:
            ds = build_dataset(cfg, "tune", cache_dir=str(tmp_path))
            results.append(np.stack([ds.raw(i)[0] for i in range(len(ds))]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    for cache_dir in (None, str(tmp_path)):
        ds = build_dataset(make_cfg(sizes={"val": 4}), "val", cache_dir=cache_dir)
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(ds[2][0], clone[2][0]) and torch.equal(ds[2][1], clone[2][1])


def test_dataloader_batches():
    ds = build_dataset(make_cfg(sizes={"train": 8}), "train", augment=AUG)
    images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 64, 80) and masks.shape == (4, 64, 80)


# --- factory errors -------------------------------------------------------------------------------


def test_unknown_dataset_name_lists_valid_choices():
    with pytest.raises(ValueError, match="synthetic"):
        build_dataset(make_cfg(name="cityscapes-typo"), "train")


def test_unknown_split_lists_valid_choices():
    with pytest.raises(ValueError, match="train, tune, val"):
        build_dataset(make_cfg(), "test")


def test_split_without_a_size_is_rejected():
    with pytest.raises(ValueError, match="sizes"):
        build_dataset(make_cfg(sizes={"train": 4}), "val")


def test_class_count_and_names_must_match_the_generator():
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset(make_cfg(num_classes=19), "train")
    names = list(synthetic.CLASS_NAMES)
    names[0], names[1] = names[1], names[0]
    with pytest.raises(ValueError, match="class_names"):
        build_dataset(make_cfg(class_names=names), "train")
