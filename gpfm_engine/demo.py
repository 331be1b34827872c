"""The bundled demo input: a few synthesized slides (plus the real ones in ../shared/data).

``python -m gpfm_engine.demo DIR`` synthesizes the demo slides into ``DIR/slides`` (once; they are
reused on later runs), writes ``DIR/slides.csv`` listing them (path, optional mpp) and prints the
CSV's path, so ``./dev demo`` can hand it to a real ``gpfm-engine extract``. The slides cover the
cases the engine must get right: an Aperio-style SVS, a generic TIFF with Aperio-style RGB JPEG
tiles at an odd µm/px (0.263, a GT450), and an LZW tiled TIFF at 0.5 µm/px (20x); each a few
hundred patches, so the whole demo extracts in well under two minutes on two CPU cores.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from gpfm_engine import synth

# name -> write_slide arguments. Sizes are chosen for a few hundred 128 µm patches per slide.
DEMO_SLIDES: dict[str, dict] = {
    "demo-aperio-40x.svs": dict(size=(8000, 6000), fmt="svs", compression="jpeg", mpp=0.25, objective=40, seed=11,
                                coverage=0.95),
    "demo-gt450-rgb.tiff": dict(size=(6000, 4600), fmt="tiff", compression="jpeg_rgb", mpp=0.263, seed=12,
                                coverage=0.95),
    "demo-20x-lzw.tiff": dict(size=(8000, 6000), fmt="tiff", compression="lzw", mpp=0.5, seed=13, coverage=0.9),
}
# Real slides from ../shared/data/wsi that OpenSlide opens and that carry a trustworthy mpp.
REAL_SLIDES = ("aperio/CMU-1-Small-Region.svs", "hamamatsu-ndpi/test3-DAPI-2-(387).ndpi")


def shared_data_dir() -> Path | None:
    """``$GPFM_TEST_DATA`` or ``../shared/data`` beside the source checkout, when present."""
    env = os.environ.get("GPFM_TEST_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def make_demo_slides(folder: Path) -> list[Path]:
    """Synthesize the demo slides into ``folder`` (skipping those already written with the same recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, kwargs in DEMO_SLIDES.items():
        path = folder / name
        stamp = folder / f".{name}.json"
        recipe = json.dumps(kwargs, sort_keys=True)
        if not (path.exists() and stamp.exists() and stamp.read_text() == recipe):
            synth.write_slide(path, **kwargs)
            stamp.write_text(recipe)
        out.append(path)
    return out


def write_demo_list(root: Path) -> Path:
    """Synthesized + available real slides as ``root/slides.csv`` (the ``extract`` input)."""
    slides = make_demo_slides(root / "slides")
    data = shared_data_dir()
    if data is not None:
        slides += [data / "wsi" / rel for rel in REAL_SLIDES if (data / "wsi" / rel).is_file()]
    listing = root / "slides.csv"
    with open(listing, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "mpp"])
        for p in slides:
            w.writerow([str(p.resolve()), ""])
    return listing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "demo_out")
    print(write_demo_list(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
