"""ImageFolder scanning follows torchvision's rules, and bad trees fail with one clear line."""

import pytest

from tests.conftest import make_imagefolder, write_image
from vitpod.data import imagefolder
from vitpod.errors import UserError


def test_classes_are_sorted_folder_names_and_extensions_match_case_insensitively(tmp_path, rng):
    for cls, name in [("b", "x.JPEG"), ("a", "y.Png"), ("C", "z.jpg"), ("a", "w.webp")]:
        write_image(tmp_path / cls / name, 0, rng)
    split = imagefolder.scan(str(tmp_path))
    assert split.classes == ("C", "a", "b")  # plain sorted(), as torchvision: uppercase first
    assert split.files == ("C/z.jpg", "a/w.webp", "a/y.Png", "b/x.JPEG")
    assert split.labels == (0, 1, 1, 2)


def test_nested_files_count_for_their_class_and_hidden_entries_are_ignored(tmp_path, rng):
    write_image(tmp_path / "cat" / "deep" / "er" / "1.png", 0, rng)
    write_image(tmp_path / "cat" / ".hidden.png", 0, rng)
    write_image(tmp_path / "cat" / ".cache" / "2.png", 0, rng)
    write_image(tmp_path / "dog" / "3.bmp", 0, rng)
    write_image(tmp_path / ".ipynb_checkpoints" / "4.png", 0, rng)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    split = imagefolder.scan(str(tmp_path))
    assert split.classes == ("cat", "dog")
    assert split.files == ("cat/deep/er/1.png", "dog/3.bmp")


def test_missing_data_dir_names_it(tmp_path):
    with pytest.raises(UserError, match="does not exist.*data.train_dir"):
        imagefolder.scan(str(tmp_path / "nope"))


def test_dir_without_class_folders_is_refused(tmp_path, rng):
    write_image(tmp_path / "loose.png", 0, rng)
    with pytest.raises(UserError, match="has no class folders"):
        imagefolder.scan(str(tmp_path))


def test_class_folder_without_images_is_named(tmp_path, rng):
    write_image(tmp_path / "a" / "1.png", 0, rng)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="empty, texts hold no images"):
        imagefolder.scan(str(tmp_path))


def test_val_classes_must_match_train_classes(tmp_path):
    make_imagefolder(tmp_path / "train", {"a": 1, "b": 1})
    make_imagefolder(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(UserError, match=r"only in train \['b'\], only in val \['c'\]"):
        imagefolder.scan_splits(str(tmp_path / "train"), str(tmp_path / "val"))


def test_manifest_round_trips_through_json(tmp_path):
    make_imagefolder(tmp_path / "train", {"a": 2, "b": 2})
    make_imagefolder(tmp_path / "val", {"a": 1, "b": 1})
    splits = imagefolder.scan_splits(str(tmp_path / "train"), str(tmp_path / "val"))
    imagefolder.save(str(tmp_path / "manifest.json"), splits)
    assert imagefolder.load(str(tmp_path / "manifest.json")) == splits
