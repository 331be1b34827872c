"""Feature outputs: TRIDENT-compatible h5 (and CLAM-style .pt), written atomically, resumable.

Layout of an output folder ``DIR``::

    DIR/h5_files/<slide>.h5      features [N, D] float32 (or float16), coords [N, 2] int64 level-0
                                 top-left; TRIDENT's attrs on ``coords`` plus ours (see ``coords_attrs``)
    DIR/pt_files/<slide>.pt      features only, a bare float tensor (CLAM), when asked for
    DIR/recipes/<slide>.json     the recipe the slide was computed with (human- and tool-readable)
    DIR/locks/<slide>.lock       present while a process works on the slide (see ``locks``)
    DIR/run.json                 per-slide status of the runs (see ``runlog``)

Crash safety: every file is written under a temporary name (``*.tmp``, which no consumer globs),
fsynced, then renamed. The h5 rename is the commit point and comes last, after the sidecar and the
.pt, so whatever instant a process dies, a ``<slide>.h5`` is either absent or complete.

Resume: ``decide`` is the one place that says whether a slide is done. It is done only when its
h5 and its sidecar exist and both carry the current run's recipe hash (model, weights hash,
geometry, preprocessing, precision, stored dtype). An output computed with a *different* recipe is
never silently replaced: the slide is refused with a message naming what changed, unless the
run passes ``overwrite=True`` (``--overwrite``).
"""
from __future__ import annotations

import enum
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from gpfm_engine import locks
from gpfm_engine.errors import GpfmError

log = logging.getLogger(__name__)

FORMATS = ("h5", "pt")
STORE_DTYPES = ("float32", "float16")
# Suffixes that belong to the slide format rather than to the slide's name.
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf")
_FINGERPRINT_SPAN = 1 << 18


class OutputError(GpfmError):
    """The output folder cannot be written (read-only, full, not a directory...)."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {cause}")


# ----------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary sibling a file is written under before its atomic rename."""
    return path.with_name(path.name + ".tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


# ----------------------------------------------------------------------------- recipes


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def recipe_sha256(recipe: Mapping[str, Any]) -> str:
    """Hash of everything that determines a slide's features (see module docstring)."""
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


def recipe_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two recipes (for a one-line refusal message)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(f"{key}.{k}" for k in recipe_diff(a, b))
        elif canonical_json(a) != canonical_json(b):
            out.append(key)
    return out


# ----------------------------------------------------------------------------- names


def slide_stem(path: Path) -> str:
    """A slide's name: its file name without the format suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suffix in _MULTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def source_fingerprint(path: Path) -> str:
    """A cheap identity of a slide file: size plus the first and last 256 KiB.

    It survives moving or renaming the file (so resume still recognises it) and tells apart two
    different slides that share a file name (so neither overwrites the other's output).
    """
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(_FINGERPRINT_SPAN))
            if size > _FINGERPRINT_SPAN:
                f.seek(max(_FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN))
                h.update(f.read(_FINGERPRINT_SPAN))
    except OSError:
        # Unreadable (the slide will fail with a clear error later): identify it by its path.
        h.update(os.fsencode(str(path.absolute())))
    return h.hexdigest()


def _name_candidates(stem: str, fingerprint: Callable[[], str]) -> Iterator[str]:
    yield stem
    yield f"{stem}-{fingerprint()[:8]}"
    for k in itertools.count(2):
        yield f"{stem}-{fingerprint()[:8]}-{k}"


class _Lazy:
    """A value computed on first call, then remembered."""

    def __init__(self, compute: Callable[[], str]) -> None:
        self._compute = compute
        self._value: str | None = None

    def __call__(self) -> str:
        if self._value is None:
            self._value = self._compute()
        return self._value


# ----------------------------------------------------------------------------- decisions


class Action(str, enum.Enum):
    RUN = "run"
    SKIP = "skip"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    """What to do with one slide, and why (the reason ends up in logs and run.json)."""

    action: Action
    reason: str


@dataclass(frozen=True)
class SlidePaths:
    h5: Path
    pt: Path
    recipe: Path
    lock: Path


class FeatureStore:
    """The output folder of an extraction run."""

    def __init__(self, root: str | Path, formats: Sequence[str] = ("h5",), dtype: str = "float32") -> None:
        unknown = set(formats) - set(FORMATS)
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
        if "h5" not in formats:
            # The h5 carries coords and the recipe; it is what makes a slide resumable.
            formats = ("h5", *formats)
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        self.root = Path(root)
        self.formats = tuple(formats)
        self.dtype = dtype

    # --- layout
    @property
    def h5_dir(self) -> Path:
        return self.root / "h5_files"

    def paths(self, name: str) -> SlidePaths:
        return SlidePaths(
            h5=self.h5_dir / f"{name}.h5",
            pt=self.root / "pt_files" / f"{name}.pt",
            recipe=self.root / "recipes" / f"{name}.json",
            lock=self.root / "locks" / f"{name}.lock",
        )

    def prepare(self) -> None:
        """Create the folders and prove they are writable; one ``OutputError`` line otherwise."""
        dirs = [self.root, self.h5_dir, self.root / "recipes", self.root / "locks"]
        if "pt" in self.formats:
            dirs.append(self.root / "pt_files")
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test.{locks.HOST}.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputError(self.root, f"output folder is not writable ({exc.strerror or exc})") from exc

    # --- names
    def assign_names(self, paths: Sequence[Path]) -> list[str]:
        """One output name per slide path, in order: the file stem, made unique.

        A stem already used by an earlier slide of this run, or by an existing output that came
        from a different file (different ``source_fingerprint``), gets ``-<8 hex>`` of this file's
        fingerprint appended. The rule is deterministic, so a rerun finds the same names. Files are
        fingerprinted only when a name is contested (a 10,000-slide cohort on a network share is
        not read twice before the run starts); identical copies of one file get a counter too.
        """
        used: set[str] = set()
        names: list[str] = []
        for path in paths:
            fingerprint = _Lazy(lambda p=path: source_fingerprint(p))
            name = next(c for c in _name_candidates(slide_stem(path), fingerprint)
                        if c not in used and self._name_free_for(c, fingerprint))
            used.add(name)
            names.append(name)
        return names

    def _name_free_for(self, name: str, fingerprint: Callable[[], str]) -> bool:
        attrs = self.read_attrs(name)
        if attrs is None:
            return True
        recorded = attrs.get("source_fingerprint")
        return recorded is None or recorded == fingerprint()

    # --- reading back
    def read_attrs(self, name: str) -> dict[str, Any] | None:
        """The ``coords`` attrs of an existing output, {} when unreadable, None when absent."""
        h5 = self.paths(name).h5
        if not h5.exists():
            return None
        try:
            with h5py.File(h5, "r") as f:
                return {k: _plain(v) for k, v in f["coords"].attrs.items()}
        except (OSError, KeyError):
            return {}

    def decide(self, name: str, recipe: Mapping[str, Any], overwrite: bool = False) -> Decision:
        """THE resume decision for one slide (see the module docstring for the rules)."""
        sha = recipe_sha256(recipe)
        p = self.paths(name)
        attrs = self.read_attrs(name)
        if attrs is None:
            return Decision(Action.RUN, "new")
        if attrs.get("recipe_sha256") != sha:
            if overwrite:
                return Decision(Action.RUN, "recomputing (--overwrite)")
            if not attrs.get("recipe_sha256"):
                why = "an output not written by gpfm-engine (or unreadable)"
            else:
                old = _loads(attrs.get("recipe", "{}"))
                changed = ", ".join(recipe_diff(old, recipe)) or "recipe"
                why = f"an output computed with a different recipe ({changed})"
            return Decision(Action.REFUSE, f"{p.h5} is {why}; pass --overwrite to recompute it")
        missing = [str(q) for q in self._required(p) if not q.exists()]
        if missing or _loads(_read_text(p.recipe)).get("recipe_sha256") != sha:
            return Decision(Action.RUN, f"incomplete (missing {', '.join(missing) or 'recipe sidecar'})")
        return Decision(Action.SKIP, "done with the same recipe")

    def _required(self, p: SlidePaths) -> list[Path]:
        return [p.h5, p.recipe] + ([p.pt] if "pt" in self.formats else [])

    # --- writing
    def lock(self, name: str) -> locks.SlideLock | None:
        return locks.try_lock(self.paths(name).lock)

    def open_writer(self, name: str, feature_dim: int) -> "SlideWriter":
        return SlideWriter(self, name, feature_dim)


def _plain(value: Any) -> Any:
    """h5py attr values as plain Python (numpy scalars and bytes decoded)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _loads(text: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(text or "{}")
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


class SlideWriter:
    """Streams one slide's rows into ``<slide>.h5.tmp``; ``commit`` publishes, ``abort`` discards.

    Rows are appended as batches arrive, so a slide's features never need to sit in memory whole.
    """

    _ROWS_PER_CHUNK = 1024

    def __init__(self, store: FeatureStore, name: str, feature_dim: int) -> None:
        self.store = store
        self.name = name
        self.paths = store.paths(name)
        self.rows = 0
        self._tmp = tmp_name(self.paths.h5)
        self._file = h5py.File(self._tmp, "w")
        self._coords = self._file.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(self._ROWS_PER_CHUNK, 2))
        self._features = self._file.create_dataset(
            "features", shape=(0, feature_dim), maxshape=(None, feature_dim), dtype=store.dtype,
            chunks=(max(1, min(self._ROWS_PER_CHUNK, (1 << 20) // (4 * max(feature_dim, 1)))), feature_dim))

    def append(self, coords: np.ndarray, features: np.ndarray) -> None:
        n = len(coords)
        if len(features) != n:
            raise ValueError(f"{n} coords but {len(features)} feature rows")
        if n == 0:
            return
        end = self.rows + n
        self._coords.resize(end, axis=0)
        self._features.resize(end, axis=0)
        self._coords[self.rows:end] = np.asarray(coords, dtype=np.int64)
        self._features[self.rows:end] = np.asarray(features, dtype=self.store.dtype)
        self.rows = end

    def commit(self, coords_attrs: Mapping[str, Any], recipe: Mapping[str, Any]) -> None:
        """Write attrs, fsync, then publish sidecar, .pt and finally the h5 (the commit point)."""
        sha = recipe_sha256(recipe)
        attrs = dict(coords_attrs, recipe_sha256=sha, recipe=canonical_json(recipe))
        for key, value in attrs.items():
            self._coords.attrs[key] = _h5_value(value)
        for key in ("name", "savetodir", "encoder"):
            if key in attrs:
                self._features.attrs[key] = _h5_value(attrs[key])
        self._file.close()
        fsync_file(self._tmp)
        atomic_write_json(self.paths.recipe, {"slide": self.name, "recipe_sha256": sha, "recipe": dict(recipe)})
        if "pt" in self.store.formats:
            self._write_pt()
        os.replace(self._tmp, self.paths.h5)
        fsync_dir(self.paths.h5.parent)

    def _write_pt(self) -> None:
        import torch

        with h5py.File(self._tmp, "r") as f:
            feats = torch.from_numpy(f["features"][()])
        tmp = tmp_name(self.paths.pt)
        with open(tmp, "wb") as fh:
            torch.save(feats, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.paths.pt)
        fsync_dir(self.paths.pt.parent)

    def abort(self) -> None:
        """Discard the temporary file (the published outputs, if any, are left untouched)."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a broken file must not mask the real error
            pass
        for tmp in (self._tmp, tmp_name(self.paths.pt)):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _h5_value(value: Any) -> Any:
    """Attr values h5py can store: None becomes "", sequences become arrays."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if isinstance(value, Mapping):
        return canonical_json(value)
    return value


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features, coords, coords attrs) of an h5 written by the engine (or by TRIDENT)."""
    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()], {k: _plain(v) for k, v in f["coords"].attrs.items()}
