"""The linear-probe helpers on small synthetic data (the real patch sets are only in ../shared/data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.linear_probe import colour_features, dihedral_views, load_sets, probe, probe_cv


def test_dihedral_views_are_the_eight_symmetries() -> None:
    img = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    views = [np.asarray(v) for v in dihedral_views(img, 8)]
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    assert np.array_equal(views[0], np.asarray(img)) and len(dihedral_views(img, 1)) == 1


def test_probe_separates_separable_classes_and_averages_views() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b"] * 6
    x = rng.normal(size=(12, 3, 4)) + np.array([0.0 if y == "a" else 4.0 for y in labels])[:, None, None]
    assert probe(x[:8], labels[:8], x[8:], labels[8:], c=1.0)["balanced_accuracy"] == 1.0
    assert probe_cv(x, labels, c=1.0, repeats=2, folds=2)["balanced_accuracy"] == 1.0


def test_load_sets_maps_kather_folders_and_keeps_shared_classes(tmp_path: Path) -> None:
    def save(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 100, 150)).save(path)

    for name in ("TUM-X1.png", "LYM-X2.png"):
        save(tmp_path / "crc-val-he-7k-png" / name)
    save(tmp_path / "nct-crc-he-100k" / "BACK-Y1.tif")  # no BACK in the test set: left out
    save(tmp_path / "nct-crc-he-100k" / "TUM-Y2.tif")
    save(tmp_path / "kather2016-texture" / "04_LYMPHO" / "z.tif")
    save(tmp_path / "kather2016-texture" / "03_COMPLEX" / "w.tif")  # no counterpart: left out
    sets = load_sets(tmp_path)
    assert sets["A"].labels == ["TUM", "LYM"] and sorted(sets["B"].labels) == ["LYM", "TUM"]
    assert colour_features([Image.open(sets["A"].paths[0])]).shape == (1, 21)
