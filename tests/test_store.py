"""Outputs: TRIDENT/CLAM-readable files, atomic publication, the resume decision, locks, run.json,
slide names and the SLIDES argument parsing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gpfm_engine import locks
from gpfm_engine.inputs import InputError, SlideInput, collect_slides
from gpfm_engine.runlog import RunLog, SlideRecord, Status
from gpfm_engine.store import Action, FeatureStore, OutputError, recipe_sha256, source_fingerprint

RECIPE = {"model": "m", "weights_sha256": "ab" * 32, "precision": "fp32",
          "geometry": {"fov_um": 128.0, "overlap": 0.0}, "preprocessing": {"input_size": 224}}
ATTRS = {"patch_size": 224, "patch_size_level0": 512, "level0_magnification": 40.0,
         "target_magnification": 17.5, "overlap": 0, "name": "s", "savetodir": "x",
         "level0_width": 1000, "level0_height": 800, "encoder": "m", "tiles_skipped": 0}


def write_slide_output(store: FeatureStore, name: str, n: int = 5, d: int = 8, recipe=RECIPE) -> tuple:
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 1000, size=(n, 2))
    feats = rng.standard_normal((n, d)).astype(np.float32)
    w = store.open_writer(name, d)
    w.append(coords[:2], feats[:2])
    w.append(coords[2:], feats[2:])
    w.commit(dict(ATTRS, name=name), recipe)
    return coords, feats


def test_h5_layout_is_what_trident_and_clam_read(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, formats=("h5", "pt"))
    store.prepare()
    coords, feats = write_slide_output(store, "s")
    with h5py.File(tmp_path / "h5_files" / "s.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (5, 8)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (5, 2)
        np.testing.assert_array_equal(f["coords"][()], coords)
        np.testing.assert_array_equal(f["features"][()], feats)
        a = f["coords"].attrs
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                    "overlap", "level0_width", "level0_height", "name"):
            assert key in a
        assert a["recipe_sha256"] == recipe_sha256(RECIPE)
        assert f["features"].attrs["encoder"] == "m"
    pt = torch.load(tmp_path / "pt_files" / "s.pt", weights_only=True)
    assert torch.equal(pt, torch.from_numpy(feats))
    sidecar = json.loads((tmp_path / "recipes" / "s.json").read_text())
    assert sidecar["recipe_sha256"] == recipe_sha256(RECIPE)
    assert not list(tmp_path.rglob("*.tmp"))


def test_float16_storage_and_empty_slide(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, dtype="float16")
    store.prepare()
    write_slide_output(store, "half")
    w = store.open_writer("empty", 8)
    w.commit(dict(ATTRS, name="empty"), RECIPE)
    with h5py.File(tmp_path / "h5_files" / "half.h5", "r") as f:
        assert f["features"].dtype == np.float16
    with h5py.File(tmp_path / "h5_files" / "empty.h5", "r") as f:  # TRIDENT: explicit empty result
        assert f["features"].shape == (0, 8) and f["coords"].shape == (0, 2)


def test_resume_decision(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, formats=("h5", "pt"))
    store.prepare()
    assert store.decide("s", RECIPE).action is Action.RUN
    write_slide_output(store, "s")
    assert store.decide("s", RECIPE).action is Action.SKIP
    changed = dict(RECIPE, precision="bf16", geometry={"fov_um": 112.0, "overlap": 0.0})
    d = store.decide("s", changed)
    assert d.action is Action.REFUSE and "precision" in d.reason and "geometry.fov_um" in d.reason
    assert "--overwrite" in d.reason
    assert store.decide("s", changed, overwrite=True).action is Action.RUN
    (tmp_path / "pt_files" / "s.pt").unlink()  # a requested format is missing: recompute, no refusal
    assert store.decide("s", RECIPE).action is Action.RUN
    # h5-only run over the same folder does not need the .pt
    assert FeatureStore(tmp_path).decide("s", RECIPE).action is Action.SKIP


def test_foreign_or_unfinished_files_are_never_done(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    store.prepare()
    (tmp_path / "h5_files" / "t.h5.tmp").write_bytes(b"partial")  # a killed writer's leftovers
    assert store.decide("t", RECIPE).action is Action.RUN
    with h5py.File(tmp_path / "h5_files" / "u.h5", "w") as f:  # e.g. a TRIDENT output
        f["coords"] = np.zeros((1, 2), np.int64)
        f["features"] = np.zeros((1, 4), np.float32)
    assert store.decide("u", RECIPE).action is Action.REFUSE
    (tmp_path / "h5_files" / "v.h5").write_bytes(b"garbage")
    assert store.decide("v", RECIPE).action is Action.REFUSE
    write_slide_output(store, "w")
    (tmp_path / "recipes" / "w.json").unlink()
    assert store.decide("w", RECIPE).action is Action.RUN


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, formats=("h5", "pt"))
    store.prepare()
    w = store.open_writer("s", 4)
    w.append(np.zeros((3, 2)), np.ones((3, 4)))
    w.abort()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_names_are_unique_and_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.svs").write_bytes(b"one")
    (b / "x.svs").write_bytes(b"two")
    (a / "y.ome.tif").write_bytes(b"three")
    store = FeatureStore(tmp_path / "out")
    store.prepare()
    (b / "copy").mkdir()
    (b / "copy" / "x.svs").write_bytes(b"two")  # an identical copy of b/x.svs
    names = store.assign_names([a / "x.svs", b / "x.svs", a / "y.ome.tif", b / "copy" / "x.svs"])
    assert names[0] == "x" and names[1].startswith("x-") and names[2] == "y" and names[3] == names[1] + "-2"
    assert store.assign_names([a / "x.svs", b / "x.svs", a / "y.ome.tif", b / "copy" / "x.svs"]) == names
    # an existing output of a/x.svs keeps b/x.svs away from the name "x", even run alone
    w = store.open_writer("x", 2)
    w.commit(dict(ATTRS, source_fingerprint=source_fingerprint(a / "x.svs")), RECIPE)
    assert store.assign_names([b / "x.svs"]) == [names[1]]
    moved = tmp_path / "moved.svs"
    moved.write_bytes(b"one")  # same content elsewhere: still recognised (resume after a move)
    assert source_fingerprint(moved) == source_fingerprint(a / "x.svs")


def test_prepare_refuses_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OutputError, match="not writable"):
        FeatureStore(blocker / "out").prepare()


def test_locks_exclusive_and_stale_takeover(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "s.lock"
    first = locks.try_lock(path)
    assert first is not None
    assert locks.try_lock(path) is None  # our own live pid holds it... from another process's view:
    owner = locks.read_owner(path)
    assert owner.pid == os.getpid() and owner.host == locks.HOST
    first.release()
    assert not path.exists()
    # a lock left by a dead process on this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"host": locks.HOST, "pid": int(dead.stdout), "started": time.time()}))
    assert locks.is_stale(path)
    taken = locks.try_lock(path)
    assert taken is not None and locks.read_owner(path).pid == os.getpid()
    taken.release()
    # a live owner on another host is respected until its lock stops being refreshed
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    assert locks.try_lock(path) is None
    old = time.time() - locks.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    assert locks.try_lock(path) is not None


def _race_for_lock(path: str, barrier, results) -> None:
    barrier.wait()
    lock = locks.try_lock(Path(path))
    results.put("won" if lock else "lost")
    time.sleep(0.5)  # hold it while the others try


def test_two_processes_never_hold_the_same_lock(tmp_path: Path) -> None:
    """Six processes race for a stale lock (dead owner): exactly one wins."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "s.lock"
    path.write_text(json.dumps({"host": locks.HOST, "pid": 2 ** 22 + 7, "started": 0}))  # dead pid
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race_for_lock, args=(str(path), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert outcomes.count("won") == 1, outcomes


def test_run_json_merges_rows_and_totals(tmp_path: Path) -> None:
    log1 = RunLog(tmp_path, {"command": "a"})
    log1.add(SlideRecord("s1", "/x/s1.svs", Status.DONE, patches=10, seconds=1.5))
    log2 = RunLog(tmp_path, {"command": "b"})  # a second process sharing the folder
    log2.add(SlideRecord("s2", "/x/s2.svs", Status.FAILED, error="/x/s2.svs: broken"))
    log1.add(SlideRecord("s3", "/x/s3.svs", Status.SKIPPED))
    log1.flush(finished=True)
    data = json.loads((tmp_path / "run.json").read_text())
    assert set(data["slides"]) == {"s1", "s2", "s3"}
    assert data["slides"]["s2"]["error"] == "/x/s2.svs: broken"
    assert data["totals"]["done"] == 1 and data["totals"]["failed"] == 1 and data["totals"]["patches"] == 10
    assert "finished" in data["last_run"]
    assert not (tmp_path / "run.json.lock").exists()


def test_collect_slides(tmp_path: Path) -> None:
    d = tmp_path / "cohort"
    (d / "sub").mkdir(parents=True)
    (d / "series").mkdir()
    for p in ["a.svs", "b.tiff", "notes.txt", "sub/c.ndpi", "series/f1.dcm", "series/f2.dcm"]:
        (d / p).write_bytes(b"x")
    names = lambda items: [i.path.name for i in items]  # noqa: E731
    assert names(collect_slides([d])) == ["a.svs", "b.tiff"]
    assert names(collect_slides([d], recursive=True)) == ["a.svs", "b.tiff", "f1.dcm", "c.ndpi"]
    assert names(collect_slides([str(d / "**" / "*.ndpi")])) == ["c.ndpi"]
    assert names(collect_slides([d / "a.svs", str(d / "*.svs")])) == ["a.svs"]  # deduplicated
    assert names(collect_slides([d / "missing.svs"])) == ["missing.svs"]  # kept: fails later, loudly
    csv_path = d / "list.csv"
    csv_path.write_text("case,path,mpp\n1,a.svs,0.5\n2,sub/c.ndpi,\n", encoding="utf-8")
    got = collect_slides([csv_path])
    assert got == [SlideInput(d / "a.svs", 0.5), SlideInput(d / "sub" / "c.ndpi", None)]
    (d / "bad.csv").write_text("file\nx.svs\n")
    with pytest.raises(InputError, match="no path column"):
        collect_slides([d / "bad.csv"])
