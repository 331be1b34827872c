"""``python -m training.linear_probe``: is gpfm-tiny better than nothing? A linear-probe check.

Multinomial logistic regression (standardised features, lbfgs) on frozen CLS features of the
labelled CRC patches in ../shared/data/patches, with splits that keep source images apart:

- ``A->B``: train on nct-crc-he-100k + kather2016-texture, test on crc-val-he-7k-png;
- ``B->A``: the reverse;
- ``pooled CV``: all images of A and B, stratified 4-fold cross-validation, 10 repeats (each image
  is tested exactly once per repeat, never trained on in that fold; cohorts are mixed, so this is
  the within-domain view, less hit by stain differences between cohorts).

CRC-VAL-HE-7K comes from other patients than NCT-CRC-HE-100K, and Kather 2016 from another
cohort. Labels: the NCT/CRC-VAL file-name prefix; Kather 2016 folders mapped to the same names
(TUMOR->TUM, STROMA->STR, LYMPHO->LYM, DEBRIS->DEB, MUCOSA->NORM, ADIPOSE->ADI); classes absent
from CRC-VAL (BACK, Kather's COMPLEX and EMPTY) are left out. Every image is resized to the
model's input size (bicubic) and, by default, seen in its 8 rotations/flips: the views of one
source image are always on the same side of a split (trained on together; at test time their
class probabilities are averaged into one prediction per image). Compared feature sets: the trained weights, the same architecture
with random weights (registry initialisation, and the LayerScale-1.0 start of the tiny run), and
colour statistics (per RGB channel: mean, std, 5/25/50/75/95th percentiles). Reported: balanced
accuracy (held-out splits: with a 1000x bootstrap std over test images; CV: mean and std over
repeats) and macro-F1, for C in {0.1, 1, 10}, all three shown rather than one picked on the test. These sets are tiny (26 vs 32 images):
read the numbers as a smoke test of the features, not as a benchmark.
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from gpfm_engine.errors import GpfmError
from training.entry import run_entry_point

log = logging.getLogger("training.linear_probe")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "patches"
KATHER2016 = {"01_TUMOR": "TUM", "02_STROMA": "STR", "04_LYMPHO": "LYM", "05_DEBRIS": "DEB", "06_MUCOSA": "NORM",
              "07_ADIPOSE": "ADI"}
C_VALUES = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class Labelled:
    paths: list[Path]
    labels: list[str]


def load_sets(root: Path) -> dict[str, Labelled]:
    """Group A (nct-crc-he-100k + kather2016-texture) and group B (crc-val-he-7k-png), shared classes only."""
    def prefixed(folder: Path) -> list[tuple[Path, str]]:
        return [(p, p.name.split("-")[0]) for p in sorted(folder.iterdir()) if p.is_file()]

    test_b = prefixed(root / "crc-val-he-7k-png")
    classes = {lab for _, lab in test_b}
    group_a = prefixed(root / "nct-crc-he-100k") + [
        (p, KATHER2016[d.name]) for d in sorted((root / "kather2016-texture").iterdir()) if d.name in KATHER2016
        for p in sorted(d.iterdir())]
    group_a = [(p, lab) for p, lab in group_a if lab in classes]
    if not test_b or not group_a:
        raise GpfmError(f"{root}: expected nct-crc-he-100k, kather2016-texture and crc-val-he-7k-png")
    return {name: Labelled([p for p, _ in items], [lab for _, lab in items]) for name, items in (("A", group_a), ("B", test_b))}


def dihedral_views(img: Image.Image, n_views: int) -> list[Image.Image]:
    """The first ``n_views`` of the 8 rotations/flips of an image (label-preserving in histology)."""
    ops = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
           Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.TRANSPOSE, Image.Transpose.FLIP_TOP_BOTTOM,
           Image.Transpose.TRANSVERSE]
    return [img if op is None else img.transpose(op) for op in ops[:n_views]]


def colour_features(images: Sequence[Image.Image]) -> np.ndarray:
    rows = []
    for im in images:
        x = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3)
        rows.append(np.concatenate([x.mean(0), x.std(0), np.percentile(x, [5, 25, 50, 75, 95], axis=0).ravel()]))
    return np.stack(rows)


def model_features(model: torch.nn.Module, images: Sequence[Image.Image], batch: int = 16) -> np.ndarray:
    """CLS features at the model's input size and normalisation (from its registry cfg)."""
    cfg = model.cfg
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((cfg.input_size,) * 2, Image.Resampling.BICUBIC),
                                                         dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
                             for im in images[i:i + batch]])
            out.append(model((x - mean) / std).float().numpy())
    return np.concatenate(out)


def _fit_predict(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, c: float) -> np.ndarray:
    """Fit on every view of the training images ``[n, V, D]``; an image's prediction averages the
    class probabilities of its views ``[m, V, D]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_views, dim = train_x.shape[1], train_x.shape[2]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=10000))
    clf.fit(train_x.reshape(-1, dim), np.repeat(np.asarray(train_y), n_views))
    proba = clf.predict_proba(test_x.reshape(-1, dim)).reshape(test_x.shape[0], test_x.shape[1], -1).mean(1)
    return clf.classes_[proba.argmax(1)]


def probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], c: float, seed: int = 0) -> dict:
    """One held-out split: balanced accuracy, its bootstrap std over test images, macro-F1."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    pred = _fit_predict(train_x, train_y, test_x, c)
    y = np.asarray(test_y)
    rng = np.random.default_rng(seed)
    boots = []
    with warnings.catch_warnings():  # a resample may miss a class that was predicted: expected here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(1000):
            idx = rng.integers(0, len(y), len(y))
            if len(set(y[idx])) > 1:
                boots.append(balanced_accuracy_score(y[idx], pred[idx]))
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)), "bootstrap_std": float(np.std(boots)),
            "macro_f1": float(f1_score(y, pred, average="macro"))}


def probe_cv(x: np.ndarray, y: list[str], c: float, repeats: int = 10, folds: int = 4) -> dict:
    """Stratified k-fold CV, repeated: mean/std over repeats of the out-of-fold scores."""
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(y)
    bacc, f1 = [], []
    for r in range(repeats):
        pred = np.empty_like(labels)
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=r).split(x, labels):
            pred[te] = _fit_predict(x[tr], labels[tr], x[te], c)
        bacc.append(balanced_accuracy_score(labels, pred))
        f1.append(f1_score(labels, pred, average="macro"))
    return {"balanced_accuracy": float(np.mean(bacc)), "bootstrap_std": float(np.std(bacc)), "macro_f1": float(np.mean(f1))}


def feature_sets(weights: Path | None) -> dict[str, Callable[[Sequence[Image.Image]], np.ndarray]]:
    from gpfm_engine.models import build_model, load_model

    trained = load_model("gpfm-tiny", weights=weights)

    def random_model(**arch: float) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("gpfm-tiny", **arch).eval()

    return {
        f"gpfm-tiny ({trained.weights_source}, sha256 {trained.weights_sha256[:12]})": lambda ims: model_features(trained, ims),
        "gpfm-tiny random init (registry, LayerScale 1e-5)": lambda ims: model_features(random_model(), ims),
        "gpfm-tiny random init (LayerScale 1.0, tiny.yaml start)": lambda ims: model_features(random_model(init_values=1.0), ims),
        "colour statistics (RGB mean, std, 5/25/50/75/95 pct)": colour_features,
    }


def run(data: Path, weights: Path | None, n_views: int = 8) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    sets = load_sets(data)
    images = {k: [view for p in v.paths for view in dihedral_views(Image.open(p).convert("RGB"), n_views)]
              for k, v in sets.items()}
    results: dict = {"data": str(data), "n": {k: len(v.paths) for k, v in sets.items()}, "views_per_image": n_views,
                     "classes": sorted(set(sets["B"].labels)), "splits": {}}
    for name, features in feature_sets(weights).items():
        feats = {k: (f := features(v)).reshape(len(v) // n_views, n_views, f.shape[-1]) for k, v in images.items()}
        for split, (tr, te) in {"A->B": ("A", "B"), "B->A": ("B", "A")}.items():
            results["splits"].setdefault(split, {})[name] = {
                f"C={c}": probe(feats[tr], sets[tr].labels, feats[te], sets[te].labels, c) for c in C_VALUES}
        pooled_x, pooled_y = np.concatenate([feats["A"], feats["B"]]), sets["A"].labels + sets["B"].labels
        results["splits"].setdefault("pooled CV", {})[name] = {f"C={c}": probe_cv(pooled_x, pooled_y, c) for c in C_VALUES}
    return results


def to_markdown(results: dict) -> str:
    lines = []
    n = results["n"]
    for split, table in results["splits"].items():
        what = (f"4-fold CV x10 over {n['A'] + n['B']} images: balanced accuracy mean ± std over repeats / macro-F1"
                if split == "pooled CV" else
                f"train {n[split[0]]}, test {n[split[-1]]} images: balanced accuracy ± bootstrap std / macro-F1")
        lines += [f"\n{split} ({what})", "",
                  "| features | " + " | ".join(f"C={c}" for c in C_VALUES) + " |", "|---|" + "---|" * len(C_VALUES)]
        for name, row in table.items():
            cells = [f"{r['balanced_accuracy']:.3f} ± {r['bootstrap_std']:.3f} / {r['macro_f1']:.3f}" for r in row.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.linear_probe", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the three patch sets")
    p.add_argument("--weights", type=Path, default=None, help="gpfm-tiny weights (default: the packaged file)")
    p.add_argument("--views", type=int, default=8, choices=range(1, 9), metavar="1..8",
                   help="rotations/flips per image: all train on the same side of a split, test averages them")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    results = run(args.data, args.weights, args.views)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    run_entry_point(main, log)
