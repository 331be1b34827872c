"""``gpfm-engine info SLIDE...``: descriptions for good slides, one error line per bad one."""
from __future__ import annotations

import json

from click.testing import CliRunner

from gpfm_engine.cli import main


def test_info_describes_slides_and_reports_each_bad_one(slide_factory, tmp_path):
    good = slide_factory(size=(700, 530), fmt="svs", compression="jpeg", tile=128, downsample=2)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    result = CliRunner().invoke(main, ["info", "--json", str(good), str(empty), str(tmp_path / "missing.tif")])
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "empty file" in errors[0] and "no such file" in errors[1]
    (info,) = json.loads(result.stdout)
    assert info["vendor"] == "aperio" and info["backend"] == "tiff" and info["mpp"] == [0.25, 0.25]
    assert [lv["width"] for lv in info["levels"]] == [700, 350, 175]
    assert info["levels"][1]["mpp"] == [0.5, 0.5] and info["levels"][0]["compression"] == "jpeg"
    assert set(info["associated_images"]) == {"thumbnail", "label", "macro"}
    assert info["objective_power"] == 40.0


def test_info_table_output(slide_factory):
    good = slide_factory(size=(700, 530), fmt="ome", compression="lzw", tile=128, downsample=2)
    result = CliRunner().invoke(main, ["info", str(good)])
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    assert "backend" in words and "tiff)" in words and "350x265" in words and "lzw" in words
