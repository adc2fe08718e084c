from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.dataset import (
    ImageDataset,
    MissingSequenceError,
    Sample,
    SplitSamples,
    class_counts,
    class_weights,
    format_class_table,
    load_splits,
    make_weighted_sampler,
    scan_folder,
    split_samples,
)
from core.errors import ImageReadError
from core.labels import CLASSES_15, CLASSES_44, UnknownFolderError
from core.near_duplicates import (
    NEAR_DUPLICATE_DISTANCE,
    group_near_duplicates,
    hamming_distance,
    perceptual_hash,
)
from tests.factories import (
    make_dataset,
    make_flat_dataset,
    make_image,
    make_split_dataset,
)

# --------------------------------------------------------------------------- scanning


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("k44"), per_folder=1, size=32)


def test_scan_44c_layout_in_both_label_modes(kaggle_root: Path) -> None:
    s44 = scan_folder(kaggle_root, mode="44")
    assert len(s44) == 44
    assert sorted(s.label for s in s44) == list(range(44))
    assert all(CLASSES_44[s.label] == s.folder.replace("_NORMAL", "Normal") for s in s44)

    s15 = scan_folder(kaggle_root, mode=15)
    assert len(s15) == 44
    counts = Counter(CLASSES_15[s.label] for s in s15)
    assert counts["Normal"] == 2 and counts["Glioblastoma"] == 3 and len(counts) == 15
    # Deterministic order: by label, then path.
    assert s15 == sorted(s15, key=lambda s: (s.label, s.path.as_posix()))
    assert s15 == scan_folder(kaggle_root, mode="15")


def test_scan_plain_15_folder_layout(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders=list(CLASSES_15), per_folder=1, size=24)
    samples = scan_folder(root, mode="15")
    assert sorted(s.label for s in samples) == list(range(15))
    with pytest.raises(MissingSequenceError) as exc:
        scan_folder(root, mode="44")
    assert set(exc.value.names) == set(CLASSES_15)
    assert "'Astrocitoma'" in str(exc.value)


def test_scan_hand_merged_messy_names(tmp_path: Path) -> None:
    folders = {
        "astrocitoma t1 ": 2,
        "ASTROCITOMA  T1C+": 1,
        "Normal": 1,
        "_NORMAL T2": 1,
        "NORMAL ": 2,
        " glioblastoma": 1,
    }
    root = make_flat_dataset(tmp_path, folders=folders, size=24)
    samples = scan_folder(root, mode="15")
    counts = Counter(CLASSES_15[s.label] for s in samples)
    assert counts == {"Astrocitoma": 3, "Normal": 4, "Glioblastoma": 1}
    assert {s.folder for s in samples} == set(folders)  # the real (untrimmed) folder names


def test_unknown_folders_are_all_listed_or_skipped_with_a_warning(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders=["Meningioma", "Normal", "Foo", "misc stuff"],
                             per_folder=1, size=24)
    with pytest.raises(UnknownFolderError) as exc:
        scan_folder(root, mode="15")
    assert exc.value.names == ("Foo", "misc stuff")
    assert "'Foo'" in str(exc.value) and "'misc stuff'" in str(exc.value)

    warnings: list[str] = []
    samples = scan_folder(root, mode="15", skip_unknown=True, on_warning=warnings.append)
    assert {s.folder for s in samples} == {"Meningioma", "Normal"}
    assert len(warnings) == 1 and "'Foo'" in warnings[0] and "'misc stuff'" in warnings[0]


def test_only_image_files_count_and_nested_folders_belong_to_their_class(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders=["Meningioma", "Normal"], per_folder=1, size=24)
    (root / "Normal" / "notes.txt").write_text("x")
    (root / "Normal" / ".DS_Store").write_bytes(b"\0")
    (root / "Normal" / "._001.png").write_bytes(b"\0")
    (root / ".hidden").mkdir()
    make_image(root / "Normal" / "patient 2" / "a.JPG", size=24)
    (root / "readme.md").write_text("data")
    samples = scan_folder(root, mode="15")
    names = sorted(s.path.name for s in samples)
    assert names == ["000_img.png", "000_img.png", "a.JPG"]


def test_empty_class_folder_warns(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders=["Meningioma", "Normal"], per_folder=1, size=24)
    (root / "Glioblastoma").mkdir()
    warnings: list[str] = []
    samples = scan_folder(root, mode="15", on_warning=warnings.append)
    assert len(samples) == 2
    assert any("Glioblastoma" in w and "no images" in w for w in warnings)


def test_empty_dataset_and_one_class_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "Normal").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images") as exc:
        scan_folder(empty, mode="15")
    assert str(empty) in str(exc.value)

    one = make_flat_dataset(tmp_path, folders=["Normal", "_NORMAL T1"], per_folder=2, size=24)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        scan_folder(one, mode="15")

    with pytest.raises(FileNotFoundError):
        scan_folder(tmp_path / "missing", mode="15")


def test_train_val_test_subfolders(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, size=32)
    assert len(scan_folder(root, mode="44")) == 6 * (4 + 2 + 2)
    splits = load_splits(root, mode="15", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 12, 12)
    assert all("/train/" in s.path.as_posix() for s in splits.train)
    assert all("/val/" in s.path.as_posix() for s in splits.val)
    assert all("/test/" in s.path.as_posix() for s in splits.test)


def test_split_layout_without_val_is_carved_from_train(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, per_split={"train": 6, "test": 2}, size=32)
    warnings: list[str] = []
    splits = load_splits(root, mode="15", seed=1, on_warning=warnings.append)
    assert len(splits.test) == 12
    assert len(splits.train) + len(splits.val) == 36 and splits.val
    assert not {s.path for s in splits.val} & {s.path for s in splits.train}
    assert any("val/" in w for w in warnings)


def test_extra_folder_beside_splits_is_reported(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, per_split={"train": 2, "val": 1, "test": 1}, size=24)
    (root / "old").mkdir()
    with pytest.raises(UnknownFolderError) as exc:
        scan_folder(root, mode="15")
    assert exc.value.names == ("old",)


# --------------------------------------------------------------------------- splitting


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imbalanced: 3 classes with 20, 10 and 4 images in the 15-label mode.
    return make_flat_dataset(
        tmp_path_factory.mktemp("split"),
        folders={"Meningioma": 20, "Glioblastoma": 10, "Normal": 4},
        size=32,
    )


def _paths(samples: tuple[Sample, ...]) -> set[Path]:
    return {s.path for s in samples}


def test_split_is_deterministic_disjoint_and_complete(split_root: Path) -> None:
    samples = scan_folder(split_root, mode="15")
    a = split_samples(samples, seed=7)
    assert a == split_samples(list(reversed(samples)), seed=7)
    assert a != split_samples(samples, seed=8)
    parts = [_paths(a.train), _paths(a.val), _paths(a.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert set.union(*parts) == {s.path for s in samples}
    assert sum(len(p) for p in parts) == len(samples)


@pytest.mark.parametrize("seed", range(5))
def test_split_is_stratified(split_root: Path, seed: int) -> None:
    samples = scan_folder(split_root, mode="15")
    splits = split_samples(samples, seed=seed)
    n = len(CLASSES_15)
    train, val, test = (class_counts(getattr(splits, k), n) for k in ("train", "val", "test"))
    for cls in ("Meningioma", "Glioblastoma", "Normal"):
        i = CLASSES_15.index(cls)
        assert val[i] >= 1 and test[i] >= 1 and train[i] >= 1, cls
    mening = CLASSES_15.index("Meningioma")
    assert (train[mening], val[mening], test[mening]) == (14, 3, 3)


def test_small_classes(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders={"Meningioma": 6, "Normal": 2, "Carcinoma": 1},
                             size=24)
    splits = split_samples(scan_folder(root, mode="15"), seed=0)
    n = len(CLASSES_15)
    normal, carcinoma = CLASSES_15.index("Normal"), CLASSES_15.index("Carcinoma")
    assert class_counts(splits.train, n)[normal] == 1
    assert class_counts(splits.val, n)[normal] == 1
    assert class_counts(splits.train, n)[carcinoma] == 1


def test_bad_fractions_are_refused(split_root: Path) -> None:
    samples = scan_folder(split_root, mode="15")
    with pytest.raises(ValueError):
        split_samples(samples, seed=0, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError):
        split_samples([], seed=0)


def test_near_duplicates_never_straddle_splits(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders={"Meningioma": 12, "Normal": 12}, size=32)
    original = root / "Meningioma" / "004_img.png"
    shutil.copy(original, root / "Meningioma" / "copy_of_004.png")
    # A re-encoded copy (JPEG) in another class folder is the same picture too.
    Image.open(root / "Normal" / "002_img.png").save(root / "Meningioma" / "n2.jpg", quality=95)
    samples = scan_folder(root, mode="15")
    hashes = {s.path: perceptual_hash(s.path) for s in samples}
    assert hashes[original] == hashes[root / "Meningioma" / "copy_of_004.png"]
    assert hamming_distance(hashes[root / "Normal" / "002_img.png"],
                            hashes[root / "Meningioma" / "n2.jpg"]) <= NEAR_DUPLICATE_DISTANCE
    # ...while distinct slices stay apart.
    assert hamming_distance(hashes[original], hashes[root / "Meningioma" / "005_img.png"]) > (
        2 * NEAR_DUPLICATE_DISTANCE
    )
    pairs = [
        (original, root / "Meningioma" / "copy_of_004.png"),
        (root / "Normal" / "002_img.png", root / "Meningioma" / "n2.jpg"),
    ]
    for seed in range(25):
        splits = split_samples(samples, seed=seed, hash_fn=hashes.__getitem__)
        where = {s.path: name for name in ("train", "val", "test")
                 for s in getattr(splits, name)}
        for a, b in pairs:
            assert where[a] == where[b], (seed, a, b)


def test_group_near_duplicates() -> None:
    hashes: list[int | None] = [0b1111, 0b1111, 0b1110, 0b0000_0000_1111 << 40, None, None]
    assert group_near_duplicates(hashes) == [0, 0, 2, 3, 4, 5]
    assert group_near_duplicates(hashes, max_distance=1) == [0, 0, 0, 3, 4, 5]
    # Transitive chains join: a~b~c even though a and c are 2 bits apart.
    chain: list[int | None] = [0b000, 0b001, 0b011, 0b111 << 61]
    assert group_near_duplicates(chain, max_distance=1) == [0, 0, 0, 3]
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, size=(5000, 4), dtype=np.int64)
    many: list[int | None] = [sum(int(w) << (63 * k) for k, w in enumerate(r)) for r in words]
    assert len(set(group_near_duplicates(many, max_distance=2))) == 5000


def test_unreadable_file_is_its_own_group(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders={"Meningioma": 4, "Normal": 4}, size=24)
    (root / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    warnings: list[str] = []
    splits = split_samples(scan_folder(root, mode="15"), seed=0, on_warning=warnings.append)
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 9
    assert any("broken.png" in w for w in warnings)


# --------------------------------------------------------------------------- weights


def _samples(labels: list[int]) -> list[Sample]:
    return [Sample(path=Path(f"/x/{i}.png"), label=lab, folder="f") for i, lab in enumerate(labels)]


def test_class_counts_and_weights_follow_class_index_order() -> None:
    # Class 1 is the most frequent, class 2 the rarest, class 3 absent: frequency order
    # (1, 0, 2) differs from index order.
    samples = _samples([0] * 3 + [1] * 6 + [2] * 1)
    counts = class_counts(samples, 4)
    assert counts == [3, 6, 1, 0]
    weights = class_weights(counts)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([1 / 3, 1 / 6, 1.0, 0.0]))
    with pytest.raises(ValueError):
        class_counts(_samples([5]), 4)


def test_weighted_sampler() -> None:
    samples = _samples([0] * 3 + [1] * 6 + [2] * 1)
    sampler = make_weighted_sampler(samples, 4, generator=torch.Generator().manual_seed(0))
    assert sampler.num_samples == 20 and sampler.replacement
    expected = [1 / 3] * 3 + [1 / 6] * 6 + [1.0]
    assert torch.allclose(sampler.weights, torch.tensor(expected, dtype=torch.double))
    draws = list(sampler)
    assert len(draws) == 20
    again = make_weighted_sampler(samples, 4, generator=torch.Generator().manual_seed(0))
    assert list(again) == draws
    assert make_weighted_sampler(samples, 4, oversample=1.0).num_samples == 10
    with pytest.raises(ValueError):
        make_weighted_sampler([], 4)


def test_format_class_table() -> None:
    splits = SplitSamples(train=tuple(_samples([0, 0, 1])), val=tuple(_samples([1])),
                          test=tuple(_samples([0])))
    table = format_class_table(splits, ("Alpha", "Beta", "Gamma"))
    lines = table.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test", "total"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln and not ln.startswith("-")}
    assert rows["Alpha"] == ["2", "0", "1", "3"]
    assert rows["Beta"] == ["1", "1", "0", "2"]
    assert rows["Gamma"] == ["0", "0", "0", "0"]
    assert rows["TOTAL"] == ["3", "1", "1", "5"]


# --------------------------------------------------------------------------- torch dataset


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img)[None]


def test_image_dataset_returns_tensor_and_label(tmp_path: Path) -> None:
    root = make_flat_dataset(tmp_path, folders=["Meningioma", "Normal"], per_folder=2, size=24)
    samples = scan_folder(root, mode="15")
    ds = ImageDataset(samples, _to_tensor)
    assert len(ds) == 4
    x, y = ds[3]
    assert x.shape == (1, 24, 24) and x.dtype == torch.float32
    assert y == samples[3].label == CLASSES_15.index("Normal")


def test_image_dataset_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "Normal" / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageDataset([Sample(path=bad, label=0, folder="Normal")], _to_tensor)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        ds[0]

    good = make_image(tmp_path / "ok.png", size=24)

    def broken(img: np.ndarray) -> torch.Tensor:
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match=r"ok\.png.*boom"):
        ImageDataset([Sample(path=good, label=0, folder="x")], broken)[0]


def test_train_preset_gets_a_per_seed_epoch_index_generator(tmp_path: Path) -> None:
    transforms = pytest.importorskip("core.transforms")
    root = make_flat_dataset(tmp_path, folders=["Meningioma", "Normal"], per_folder=2, size=48)
    samples = scan_folder(root, mode="15")
    preset = transforms.TrainPreset(
        params=transforms.PresetParams(image_size=32, rotation_degrees=30.0, hflip_p=0.5)
    )
    ds = ImageDataset(samples, preset, seed=5)
    first = [ds[i][0] for i in range(len(ds))]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # reproducible
    assert torch.equal(first[0], ImageDataset(samples, preset, seed=5)[0][0])
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # epoch matters
    other_seed = ImageDataset(samples, preset, seed=6)
    assert any(not torch.equal(a, other_seed[i][0]) for i, a in enumerate(first))
    assert first[0].shape == (3, 32, 32)


# --------------------------------------------------------------------------- confinement


def test_scan_with_roots_skips_links_leading_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = make_flat_dataset(root, per_folder=2, folders=("Glioblastoma", "Meningioma"), size=32)
    outside = make_flat_dataset(tmp_path, per_folder=2, folders=("Normal",), size=32,
                                name="outside")
    # A class folder that is a link leading outside, and one file that is.
    (data / "Normal").symlink_to(outside / "Normal")
    stray = next((outside / "Normal").iterdir())
    (data / "Glioblastoma" / "zz_stray.png").symlink_to(stray)
    # A link that stays inside the roots is ordinary data.
    first = sorted((data / "Meningioma").iterdir())[0]
    (data / "Meningioma" / "zz_alias.png").symlink_to(first)

    warnings: list[str] = []
    samples = scan_folder(data, mode="15", roots=[root], on_warning=warnings.append)
    paths = {s.path for s in samples}
    assert not any(p.is_relative_to(data / "Normal") for p in paths)
    assert data / "Glioblastoma" / "zz_stray.png" not in paths
    assert data / "Meningioma" / "zz_alias.png" in paths
    assert {s.folder for s in samples} == {"Glioblastoma", "Meningioma"}
    # Each skip is named (the link), never where it leads.
    assert any(str(data / "Normal") in w and "outside the data roots" in w for w in warnings)
    assert any("zz_stray.png" in w for w in warnings)
    assert not any(str(tmp_path / "outside") in w for w in warnings)
    # Training scans the same way (load_splits, what core.training uses with data_roots).
    splits = load_splits(data, mode="15", seed=0, roots=[root], val_fraction=0.25,
                         test_fraction=0.0)
    split_paths = {s.path for part in (splits.train, splits.val, splits.test) for s in part}
    assert split_paths == paths
    # Without roots (python -m core.train) the links are followed as before.
    followed = {s.folder for s in scan_folder(data, mode="15")}
    assert followed == {"Glioblastoma", "Meningioma", "Normal"}
    # A data folder that itself leads outside is refused.
    (root / "elsewhere").symlink_to(tmp_path / "outside")
    from core.errors import OutsideDataRootsError

    with pytest.raises(OutsideDataRootsError):
        scan_folder(root / "elsewhere", mode="15", roots=[root])


def test_image_dataset_with_roots_refuses_a_file_swapped_for_a_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = make_image(root / "Glioblastoma" / "a.png", size=32)
    secret = make_image(tmp_path / "outside" / "secret.png", size=32)
    sample = Sample(path=path, label=0, folder="Glioblastoma")
    ds = ImageDataset([sample], lambda img: torch.zeros(1), roots=[root])
    assert ds[0][1] == 0
    path.unlink()
    path.symlink_to(secret)  # swapped after the scan, e.g. between epochs
    with pytest.raises(ImageReadError, match="leads outside the data roots"):
        ds[0]
