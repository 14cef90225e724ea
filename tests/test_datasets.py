"""The real-dataset loaders (cityscapes, voc, ade20k, camvid) on miniature copies in the real layouts.

Expected train ids are re-derived here from the datasets' published definitions (the Cityscapes
label table, VOC's 0..20 + 255, ADE20K's label - 1, CamVid's 0..10 + void 11), independently of the
lookup tables in harness/data.
"""

import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from harness.cli import main
from harness.config import CONF_DIR, load_config
from harness.errors import ConfigError
from harness.data import DATASETS, build_dataset
from harness.store import ResultsStore

from miniature import CAMVID_COUNTS, VOC_TRAIN, VOC_VAL, make_ade20k, make_camvid, make_cityscapes, make_voc

torch.set_num_threads(1)
IGNORE = 255

# cityscapesscripts/helpers/labels.py: (name, id, trainId); trainId 255 / -1 = not evaluated.
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
]


def expected_cityscapes(raw_id):
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if label_id == raw_id:
            return train_id if 0 <= train_id < 19 else IGNORE
    return IGNORE  # not a Cityscapes id (e.g. 255 where the license plate's -1 was written)


EXPECTED = {
    "cityscapes": expected_cityscapes,
    "voc": lambda v: v if v <= 20 else IGNORE,
    "ade20k": lambda v: v - 1 if 1 <= v <= 150 else IGNORE,
    "camvid": lambda v: v if v <= 10 else IGNORE,
}


def expected_mask(name, raw):
    table = np.array([EXPECTED[name](v) for v in range(256)], np.int64)
    return table[raw.astype(np.int64)]


def yaml_cfg(name, **overrides):
    cfg = yaml.safe_load((CONF_DIR / "dataset" / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    base = tmp_path_factory.mktemp("minis")
    return {
        "cityscapes": make_cityscapes(base / "cityscapes"),
        "voc": make_voc(base / "voc"),
        "ade20k": make_ade20k(base / "ade"),
        "camvid": make_camvid(base / "camvid"),
    }


def cfg_for(minis, name, **overrides):
    return yaml_cfg(name, root=str(minis[name].root), **overrides)


NAMES = ["cityscapes", "voc", "ade20k", "camvid"]


# --- registry and config files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_yaml_matches_the_dataset(name):
    cls = DATASETS[name]
    cfg = yaml_cfg(name)
    assert cfg["name"] == name and cfg["root"] is None
    assert cfg["class_names"] == list(cls.CLASS_NAMES) and cfg["num_classes"] == len(cls.CLASS_NAMES)
    assert len(cls.PALETTE) == len(cls.CLASS_NAMES) and all(len(c) == 3 for c in cls.PALETTE)
    # reports tell classes apart by colour; the published ADE20K palette repeats one colour
    # (140, 140, 140) for road and skyscraper, kept as published
    assert len(set(cls.PALETTE)) == len(cls.PALETTE) - (name == "ade20k")
    assert cfg["ignore_index"] == IGNORE and len(cfg["crop_size"]) == 2 and len(cfg["eval_size"]) == 2


def test_known_names_and_colours():
    assert DATASETS["cityscapes"].CLASS_NAMES[13] == "car" and DATASETS["cityscapes"].PALETTE[0] == (128, 64, 128)
    assert DATASETS["voc"].PALETTE[15] == (192, 128, 128)  # person in the VOC colour map
    assert DATASETS["ade20k"].CLASS_NAMES[:3] == ("wall", "building", "sky")
    assert DATASETS["ade20k"].CLASS_NAMES[-1] == "flag" and len(DATASETS["ade20k"].CLASS_NAMES) == 150
    assert DATASETS["camvid"].CLASS_NAMES[0] == "sky" and DATASETS["camvid"].CLASS_NAMES[-1] == "bicyclist"


@pytest.mark.parametrize("name", NAMES)
def test_load_config_validates_and_absolutises_root(minis, name, monkeypatch):
    root = minis[name].root
    monkeypatch.chdir(root.parent)
    cfg = load_config([f"dataset={name}", f"dataset.root={root.name}"])
    assert cfg["dataset"]["root"] == str(root.resolve()) and os.path.isabs(cfg["dataset"]["root"])
    assert cfg["dataset"]["class_names"] == list(DATASETS[name].CLASS_NAMES)


# --- label mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_raw_id_maps_exactly(minis, name):
    mini = minis[name]
    cfg = cfg_for(minis, name)
    seen = set()
    for split in ("train", "tune", "val"):
        ds = build_dataset(cfg, split)
        source = "train" if split == "tune" else split
        for i, sample in enumerate(ds.samples):
            raw = mini.labels[source][sample.key]
            image, mask = ds.raw(i)
            assert image.dtype == np.uint8 and image.shape == (*raw.shape, 3)
            np.testing.assert_array_equal(mask.astype(np.int64), expected_mask(name, raw))
            seen |= set(np.unique(raw).tolist())
    assert seen == set(range(256))  # the miniature really exercised every 8-bit id


def test_palette_png_is_read_as_indices_not_colours(minis):
    """VOC's SegmentationClass files are palette PNGs: index 15 (person) is drawn (192, 128, 128)."""
    ds = build_dataset(cfg_for(minis, "voc"), "val")
    sample = ds.samples[0]
    with Image.open(sample.label) as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    raw = minis["voc"].labels["val"][sample.key]
    _, mask = ds.raw(0)
    person = raw == 15
    assert person.any() and (mask[person] == 15).all() and (rgb[person] == (192, 128, 128)).all()
    assert (mask[raw == 255] == IGNORE).all() and (mask[raw == 21] == IGNORE).all()


@pytest.mark.parametrize("ignore", [-1, 250])
def test_other_ignore_index_replaces_255(minis, ignore):
    cfg = cfg_for(minis, "ade20k")
    _, mask_255 = build_dataset(cfg, "val")[0]
    ds = build_dataset({**cfg, "ignore_index": ignore}, "val")
    _, mask = ds[0]
    assert ds.ignore_index == ignore and (mask_255 == IGNORE).any()
    assert torch.equal(mask == ignore, mask_255 == IGNORE) and not (mask == IGNORE).any()
    assert torch.equal(mask[mask != ignore], mask_255[mask_255 != IGNORE])


def test_ignore_index_colliding_with_a_class_is_refused(minis):
    with pytest.raises(ConfigError, match="collides"):
        build_dataset(cfg_for(minis, "camvid", ignore_index=10), "val")


# --- splits -----------------------------------------------------------------------------------------


def independent_tune(keys, size, seed):
    rank = sorted(keys, key=lambda k: (hashlib.sha1(f"{seed}/{k}".encode()).hexdigest(), k))
    return set(rank[:size])


@pytest.mark.parametrize("name", NAMES)
def test_tune_is_carved_from_train_disjoint_and_stable(minis, name):
    mini = minis[name]
    cfg = cfg_for(minis, name)
    train, tune = build_dataset(cfg, "train"), build_dataset(cfg, "tune")
    train_keys, tune_keys = [s.key for s in train.samples], [s.key for s in tune.samples]
    source = set(mini.labels["train"])
    n = len(source)
    expected_size = max(1, round(cfg["tune_fraction"] * n))
    assert len(tune) == expected_size and len(train) == n - expected_size
    assert not set(train_keys) & set(tune_keys) and set(train_keys) | set(tune_keys) == source
    assert set(tune_keys) == independent_tune(source, expected_size, 0)
    assert train_keys == sorted(train_keys)
    again = build_dataset(cfg, "tune")
    assert [s.key for s in again.samples] == tune_keys
    assert len(build_dataset(cfg, "val")) == len(mini.labels["val"])


def test_tune_size_and_seed(minis):
    cfg = cfg_for(minis, "cityscapes", tune_size=3)
    keys = set(minis["cityscapes"].labels["train"])
    for seed in (0, 1, 2):
        tune = build_dataset({**cfg, "tune_seed": seed}, "tune")
        train = build_dataset({**cfg, "tune_seed": seed}, "train")
        assert {s.key for s in tune.samples} == independent_tune(keys, 3, seed)
        assert len(train) == len(keys) - 3 and not {s.key for s in tune.samples} & {s.key for s in train.samples}
    picks = {frozenset(independent_tune(keys, 3, s)) for s in (0, 1, 2)}
    assert len(picks) > 1  # the seed matters


def test_tune_membership_survives_new_training_files(minis, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(minis["cityscapes"].root, root)
    cfg = yaml_cfg("cityscapes", root=str(root), tune_size=2)
    before = {s.key for s in build_dataset(cfg, "tune").samples}
    # a new image whose rank is beyond the tune picks: nothing else moves
    new_city = root / "leftImg8bit" / "train" / "zurich"
    new_city.mkdir()
    keys = set(minis["cityscapes"].labels["train"])
    def stays_out(i):
        key = f"zurich/zurich_{i:06d}_000019"
        return key not in independent_tune(keys | {key}, 2, 0)

    stem = f"zurich_{next(i for i in range(1000) if stays_out(i)):06d}_000019"
    shutil.copy(next((root / "leftImg8bit" / "train" / "aachen").iterdir()), new_city / f"{stem}_leftImg8bit.png")
    (root / "gtFine" / "train" / "zurich").mkdir()
    shutil.copy(next((root / "gtFine" / "train" / "aachen").glob("*_labelIds.png")),
                root / "gtFine" / "train" / "zurich" / f"{stem}_gtFine_labelIds.png")
    assert {s.key for s in build_dataset(cfg, "tune").samples} == before
    assert len(build_dataset(cfg, "train")) == len(keys) + 1 - 2


def test_tune_too_large_is_a_config_error(minis):
    with pytest.raises(ConfigError, match="tune split"):
        build_dataset(cfg_for(minis, "camvid", tune_size=CAMVID_COUNTS["train"]), "train")
    with pytest.raises(ConfigError, match="tune_fraction"):
        build_dataset(cfg_for(minis, "camvid", tune_fraction=1.0), "train")


def test_camvid_folders(minis):
    assert len(build_dataset(cfg_for(minis, "camvid"), "test")) == CAMVID_COUNTS["test"]
    val_on_test = build_dataset(cfg_for(minis, "camvid", val_folder="test"), "val")
    assert {s.key for s in val_on_test.samples} == set(minis["camvid"].labels["test"])
    cfg = cfg_for(minis, "camvid", train_folders=["train", "val"], tune_size=2)
    train, tune = build_dataset(cfg, "train"), build_dataset(cfg, "tune")
    assert len(train) + len(tune) == CAMVID_COUNTS["train"] + CAMVID_COUNTS["val"]
    assert {s.key.split("/")[0] for s in train.samples + tune.samples} == {"train", "val"}


def test_voc_split_lists(minis):
    cfg = cfg_for(minis, "voc")
    train, tune, val = (build_dataset(cfg, s) for s in ("train", "tune", "val"))
    assert len(train) + len(tune) == VOC_TRAIN and len(val) == VOC_VAL
    assert {s.key for s in val.samples} == set(minis["voc"].labels["val"])


def test_voc_segmentation_class_aug(tmp_path):
    mini = make_voc(tmp_path / "voc", aug=True)
    cfg = yaml_cfg("voc", root=str(mini.root), train_aug="SegmentationClassAug", tune_size=1)
    train, tune, val = (build_dataset(cfg, s) for s in ("train", "tune", "val"))
    keys = {s.key for s in train.samples} | {s.key for s in tune.samples}
    assert keys == set(mini.labels["train_aug"])  # train_aug.txt minus the val id it listed
    assert not keys & {s.key for s in val.samples}
    for ds in (train, tune):
        for i, s in enumerate(ds.samples):
            assert "SegmentationClassAug" in s.label
            np.testing.assert_array_equal(ds.raw(i)[1], expected_mask("voc", mini.labels["train_aug"][s.key]))


def test_voc_sbd_mat_files(tmp_path):
    mini = make_voc(tmp_path / "voc", sbd=True, nested=True)
    sbd_root = mini.info["sbd_root"]
    cfg = yaml_cfg("voc", root=str(mini.root), train_aug="sbd", sbd_root=str(sbd_root), tune_size=1)
    train, tune = build_dataset(cfg, "train"), build_dataset(cfg, "tune")
    samples = train.samples + tune.samples
    sbd_ids = set((sbd_root / "train.txt").read_text().split()) | set((sbd_root / "val.txt").read_text().split())
    voc_val = set(mini.labels["val"])
    assert {s.key for s in samples} == (set(mini.labels["train"]) | sbd_ids) - voc_val
    for ds in (train, tune):
        for i, s in enumerate(ds.samples):
            _, mask = ds.raw(i)
            if s.key in mini.labels["train"]:  # VOC's own PNG wins over SBD's annotation
                assert s.label.endswith(".png")
                np.testing.assert_array_equal(mask, expected_mask("voc", mini.labels["train"][s.key]))
            else:
                assert s.label.endswith(".mat")
                np.testing.assert_array_equal(mask, mini.labels["sbd_mat"][s.key])
    assert any("/img/" in s.image for s in samples)  # an image only SBD has


def test_voc_sbd_without_its_folder_is_a_config_error(minis, tmp_path):
    with pytest.raises(ConfigError, match="sbd_root"):
        build_dataset(cfg_for(minis, "voc", train_aug="sbd"), "train")
    with pytest.raises(ConfigError, match="cls/"):
        build_dataset(cfg_for(minis, "voc", train_aug="sbd", sbd_root=str(tmp_path)), "train")
    with pytest.raises(ConfigError, match="train_aug must be one of"):
        build_dataset(cfg_for(minis, "voc", train_aug="yes"), "train")


def test_alternative_roots(minis, tmp_path):
    nested = make_voc(tmp_path / "nested", nested=True)
    assert len(build_dataset(yaml_cfg("voc", root=str(nested.root)), "val")) == VOC_VAL
    ade_inner = minis["ade20k"].root / "ADEChallengeData2016"
    assert len(build_dataset(yaml_cfg("ade20k", root=str(ade_inner)), "val")) == len(minis["ade20k"].labels["val"])


# --- items, evaluation geometry -----------------------------------------------------------------------


def test_eval_item_is_the_normalised_image_and_mask(minis):
    cfg = cfg_for(minis, "cityscapes")
    ds = build_dataset(cfg, "val")
    image, mask = ds[1]
    raw_image, raw_mask = ds.raw(1)
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    expected = (raw_image.astype(np.float64) - mean) / std
    assert image.dtype == torch.float32 and mask.dtype == torch.int64
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(mask.numpy(), raw_mask)


def test_pad_scores_native_labels_and_batches_mixed_sizes(minis):
    cfg = cfg_for(minis, "voc")
    ds = build_dataset(cfg, "val")
    sizes = {ds.raw(i)[1].shape for i in range(len(ds))}
    assert len(sizes) > 1  # the miniature's val images differ in size
    for i in range(len(ds)):
        image, mask = ds[i]
        _, raw_mask = ds.raw(i)
        h, w = raw_mask.shape
        assert tuple(image.shape) == (3, 512, 512) and tuple(mask.shape) == (512, 512)
        np.testing.assert_array_equal(mask[:h, :w].numpy(), raw_mask)
        assert (mask[h:] == IGNORE).all() and (mask[:, w:] == IGNORE).all()
        assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()
    images, masks = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert images.shape == (len(ds), 3, 512, 512) and masks.shape == (len(ds), 512, 512)


def test_pad_scales_down_an_image_larger_than_eval_size(minis):
    ds = build_dataset(cfg_for(minis, "voc", eval_size=[20, 30]), "val")
    _, raw_mask = ds.raw(0)
    h, w = raw_mask.shape  # 36 x 40 -> scale min(20/36, 30/40) -> 20 x 22
    s = min(20 / h, 30 / w)
    th, tw = round(h * s), round(w * s)
    image, mask = ds[0]
    assert tuple(mask.shape) == (20, 30) and (th, tw) == (20, 22)
    assert (mask[:, tw:] == IGNORE).all() and (mask[:, :tw] != IGNORE).any()
    rows = np.minimum(((np.arange(th) + 0.5) * h / th).astype(int), h - 1)  # nearest-exact
    cols = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(int), w - 1)
    np.testing.assert_array_equal(mask[:th, :tw].numpy(), raw_mask[rows][:, cols])


def test_resize_mode_gives_exactly_eval_size(minis):
    ds = build_dataset(cfg_for(minis, "ade20k", eval_mode="resize", eval_size=[31, 45]), "val")
    for i in range(len(ds)):
        image, mask = ds[i]
        assert tuple(image.shape) == (3, 31, 45) and tuple(mask.shape) == (31, 45)
        assert set(mask.unique().tolist()) <= set(range(150)) | {IGNORE}


def test_whole_mode_refuses_mixed_sizes(minis):
    with pytest.raises(ConfigError, match="eval_mode=pad"):
        build_dataset(cfg_for(minis, "voc", eval_mode="whole"), "val")
    # training items are cropped, so a training split of mixed sizes is fine in any mode
    ds = build_dataset(cfg_for(minis, "voc", eval_mode="whole"), "train",
                       augment={"crop_size": [24, 24], "scale_range": [0.5, 2.0], "flip": True})
    assert tuple(ds[0][0].shape) == (3, 24, 24)


def test_augmented_items_replay_with_a_seeded_generator(minis):
    aug = {"crop_size": [32, 32], "scale_range": [0.5, 2.0], "flip": True}
    ds = build_dataset(cfg_for(minis, "camvid"), "train", augment=aug)

    def draw(seed):
        ds.generator = torch.Generator().manual_seed(seed)
        return [ds[i] for i in range(len(ds))]

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert all(tuple(img.shape) == (3, 32, 32) and tuple(m.shape) == (32, 32) for img, m in a)
    assert all(set(m.unique().tolist()) <= set(range(11)) | {IGNORE} for _, m in a)


def test_class_frequencies_and_their_cache(minis, tmp_path):
    cfg = cfg_for(minis, "camvid")
    ds = build_dataset(cfg, "val", cache_dir=str(tmp_path))
    counts = np.zeros(11)
    for key in ds.samples:
        m = expected_mask("camvid", minis["camvid"].labels["val"][key.key])
        counts += np.bincount(m[m != IGNORE], minlength=11)
    np.testing.assert_allclose(ds.class_frequencies(), counts / counts.sum(), rtol=1e-12)
    assert len(list(tmp_path.glob("camvid-val-*-label-counts.json"))) == 1
    again = build_dataset(cfg, "val", cache_dir=str(tmp_path))
    np.testing.assert_allclose(again.class_frequencies(), counts / counts.sum(), rtol=1e-12)


def test_pickles_for_dataloader_workers(minis):
    ds = build_dataset(cfg_for(minis, "ade20k"), "val")
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1][1], ds[1][1])


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fragment", [
    ("cityscapes", "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png"),
    ("voc", "<root>/ImageSets/Segmentation/{train,val}.txt"),
    ("ade20k", "ADEChallengeData2016/annotations/{training,validation}"),
    ("camvid", "<root>/{train,val,test}annot/*.png"),
])
def test_missing_root_names_the_expected_layout(name, fragment, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config([f"dataset={name}"])
    assert "dataset.root is not set" in str(info.value) and fragment in str(info.value)
    with pytest.raises(ConfigError, match="is not a directory") as info:
        load_config([f"dataset={name}", f"dataset.root={tmp_path / 'nowhere'}"])
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="lacks") as info:  # an empty folder
        load_config([f"dataset={name}", f"dataset.root={tmp_path}"])
    assert fragment in str(info.value)


def test_malformed_roots(minis, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(minis["cityscapes"].root, root)
    shutil.rmtree(root / "gtFine" / "val")
    with pytest.raises(ConfigError, match="lacks gtFine/val/"):
        load_config(["dataset=cityscapes", f"dataset.root={root}"])
    # a different dataset's folder
    with pytest.raises(ConfigError, match="lacks JPEGImages/"):
        load_config(["dataset=voc", f"dataset.root={minis['cityscapes'].root}"])
    # an image without its label file: named, before any training
    root2 = tmp_path / "cv"
    shutil.copytree(minis["camvid"].root, root2)
    victim = sorted((root2 / "valannot").iterdir())[0]
    victim.unlink()
    with pytest.raises(ConfigError, match=f"has no label file {victim}"):
        build_dataset(yaml_cfg("camvid", root=str(root2)), "val")
    # a split folder with no images
    for f in (root2 / "val").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match="split 'val' has no images"):
        build_dataset(yaml_cfg("camvid", root=str(root2)), "val")


def test_colour_label_file_is_refused_with_its_name(minis, tmp_path):
    root = tmp_path / "cv"
    shutil.copytree(minis["camvid"].root, root)
    victim = sorted((root / "valannot").iterdir())[0]
    Image.open(victim).convert("RGB").save(victim)
    ds = build_dataset(yaml_cfg("camvid", root=str(root)), "val")
    with pytest.raises(ValueError, match=f"{victim.name} has image mode RGB"):
        ds[0]


@pytest.mark.parametrize("override, message", [
    ("dataset.eval_mode=crop", "eval_mode must be one of whole, pad, resize"),
    ("dataset.eval_size=[0,5]", "eval_size must be [height, width]"),
    ("dataset.tune_size=0", "tune_size must be >= 1"),
    ("dataset.std=[1,0,1]", "std must be positive"),
    ("dataset.num_classes=20", "num_classes=20"),
])
def test_bad_values_are_config_errors(minis, override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(["dataset=cityscapes", f"dataset.root={minis['cityscapes'].root}", override])
    assert message in str(info.value)


def test_cli_reports_a_missing_root_in_one_paragraph(capsys):
    assert main(["train", "dataset=cityscapes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'cityscapes'") and "leftImg8bit" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


# --- end to end ---------------------------------------------------------------------------------------


def test_train_on_miniature_cityscapes_end_to_end(minis, tiny, capsys):
    overrides = [o for o in tiny() if not o.startswith(("dataset.", "threads="))] + ["threads=1"]
    root = minis["cityscapes"].root
    assert main(["train", "dataset=cityscapes", f"dataset.root={root}", *overrides]) == 0
    out = capsys.readouterr().out
    assert "cityscapes/val" in out
    cfg = load_config(["dataset=cityscapes", f"dataset.root={root}", *overrides])
    (record,) = ResultsStore(cfg["store"]["url"]).query(dataset="cityscapes")
    assert record["status"] == "completed" and record["iterations"] == 4
    assert 0 <= record["final_miou"] <= 1 and set(record["per_class_iou_json"]) == set(cfg["dataset"]["class_names"])
    assert record["config_json"]["dataset"]["root"] == str(root.resolve())
    assert [h["iteration"] for h in record["history_json"]] == [2, 4]
