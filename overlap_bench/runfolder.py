"""The run folder: its file names, the one way to write there (:class:`RunFolder`), one writer at a time
(:func:`lock`), and ``run.json``: the kind of run that owns it and, for a sweep, its identity for ``--resume``."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Iterator

from overlap_bench import envinfo
from overlap_bench.envinfo import utc_now
from overlap_bench.errors import UserError, describe_os_error
from overlap_bench.records import CONFIRM, RECORDS, SCREEN, Loaded, RecordsError, json_safe, load_records, open_regular

log = logging.getLogger("overlap_bench.runfolder")

# Every file name of a run folder (the two record logs, RECORDS and CONFIRM, are named in records).
LOCK = "run.lock"
IDENTITY = "run.json"
ENV = "env.json"
SPEC = "spec.yaml"
SUMMARY = "summary.md"
TABLES_MD, TABLES_CSV = "tables.md", "tables.csv"
MODEL = "model.jsonl"  # the model benchmark's records (kind model), one per (M, mode)
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"
INTERFERENCE_MD, INTERFERENCE_CSV = "interference.md", "interference.csv"
PREDICTION_MD, PREDICTION_JSON = "prediction.md", "prediction.json"


def plot_name(kind: str, slug: str) -> str:
    """A plot's file name: ``<kind>_<slug>.png`` (kind: speedup, eta, breakdown, slowdown)."""
    return f"{kind}_{slug}.png"


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A temp file beside ``path``, fsync'd, given the usual mode (not mkstemp's 0600) and renamed over ``path``
    on success (readers never see half a file), removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(text)


class RunFolder:
    """One run folder and every write into it: fsync'd appends to logs, atomic replacement for the rest."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ended: set[str] = set()  # logs whose torn last line was already ended this session

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    __str__ = __fspath__

    @contextmanager
    def claim(self, kind: str, flag: str = "--out", command: str = "") -> Iterator[Path]:
        """Hold the folder's :func:`lock` while a ``kind`` run writes there; another kind's folder is refused,
        a new one gets a ``run.json`` naming kind and command."""
        with lock(self.path, flag, command):
            held = self.kind()
            if held is not None and held[0] != kind:
                a = "an" if held[0][0] in "aeiou" else "a"
                raise UserError(f"{flag} {self.path} holds {a} {held[0]} run ({held[1]}); choose another {flag}")
            if held is None:
                self.write_json(IDENTITY, {"kind": kind, "command": command or envinfo.command_line(),
                                           "created": utc_now()})
            yield self.path

    def kind(self) -> tuple[str, str] | None:
        """``(kind, the file that says so)`` of the run held here, or None: from ``run.json`` (no kind: a sweep),
        else from its records or a file only that kind writes (folders made before run.json)."""
        doc = read_identity(self.path, strict=False)
        if doc is not None:
            return doc.get("kind", "sweep"), IDENTITY
        records = load_records(self.path).records
        if records:
            return records[0].kind, RECORDS
        only = {MODEL: "model", COMPARE_JSON: "compare", INTERFERENCE_MD: "interference"}
        return next(((k, name) for name, k in only.items() if (self.path / name).exists()), None)

    def write_text(self, name: str, text: str) -> Path:
        """Replace ``name`` with ``text`` atomically."""
        write_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, doc: Any) -> Path:
        """Replace ``name`` with ``doc`` as indented strict JSON (NaN as null)."""
        return self.write_text(name, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as PNG under ``name``, atomically."""
        with atomic_file(self.path / name, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        return self.path / name

    def write_env(self) -> None:
        """Write ``env.json`` (the machine, library versions, commit)."""
        self.write_json(ENV, envinfo.collect())

    def append(self, record: Any, name: str = RECORDS) -> None:
        """Append ``record.to_json()`` to the log ``name`` as one fsync'd line."""
        path = self.path / name
        if name not in self._ended:  # a line torn by a crash must not glue onto the next record: end it
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size > 0:
                with open(path, "rb+") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")
            self._ended.add(name)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(record.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def load(self, name: str = RECORDS) -> Loaded:
        """The records of the log ``name``; a screen's or confirmation's are checked to be this run's."""
        loaded = load_records(self.path, name)
        if name in (SCREEN, CONFIRM) and loaded.records:
            self.check_stage(name, loaded.records, read_identity(self.path, strict=False) or {},
                             load_records(self.path).records)
        return loaded

    def check_stage(self, name: str, records: list[Any], ident: dict[str, Any], first: list[Any] | None) -> None:
        """Refuse (:class:`RecordsError`) second-stage ``records`` of another run: another ``run_id`` than
        ``ident``'s, none where the run stamps all its own, or a case the ``first`` pass lacks (None: unchecked)."""
        run, legacy = ident.get("run_id"), "run_id" not in ident or "stamped_since" in ident
        cases = {(r.bucket, r.label) for r in first or ()}
        for r in records:
            why = None
            if r.ab.run != run and (r.ab.run is not None or not legacy):
                why = f"it was measured by run {r.ab.run}" if r.ab.run else "its records carry no run stamp"
                why += f", and this folder's {IDENTITY} is run {run}"
            elif first is not None and (r.bucket, r.ab.pair[1]) not in cases:
                why = (f"it re-measures {r.ab.pair[1]} at {r.shape} M={r.M} ({r.dtype}, {r.world} ranks, "
                       f"{r.device}), a case its {RECORDS} does not hold")
            if why:
                raise RecordsError(f"{self.path / name}: {why}: it belongs to another run; move it away")


class FolderBusy(UserError):
    """Another process writes this run folder (or a lock from another host cannot be checked)."""


def ensure_folder(path: Path, flag: str) -> Path:
    """Create the folder ``path``; what prevents it is one :class:`UserError` naming ``flag``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag}: {path} exists and is not a folder; give a folder path") from None
    except OSError as exc:
        raise UserError(f"{flag}: {describe_os_error(exc)}; give a folder you can write") from None
    return path


def _holder(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (starting up)"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}: {info.get('command')})"


def _busy(fd: int) -> bool:
    """Whether another open file description holds an ``flock`` on ``fd``'s file (else ``fd`` takes it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return True
    return False


@contextmanager
def lock(folder: str | os.PathLike, flag: str = "--out", command: str = "") -> Iterator[Path]:
    """Hold ``folder/run.lock`` while the block runs: a second writer gets :class:`FolderBusy`, a dead holder's
    lock is taken over with a warning, another host's is refused (``flock`` need not reach across machines)."""
    folder = ensure_folder(Path(folder), flag)
    path = folder / LOCK
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{flag}: {describe_os_error(exc)}; give a folder you can write") from None
        if _busy(fd):
            os.close(fd)
            info = _holder(path.read_bytes() if path.exists() else b"")
            raise FolderBusy(f"{flag}: {folder} is being written by {_describe(info)}; wait for it to end "
                             "or choose another folder")
        with suppress(FileNotFoundError):  # else the previous holder removed the file since our open: retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        old = _holder(os.read(fd, 1 << 16))
        if old:
            if old.get("host") not in (None, host):
                raise FolderBusy(f"{flag}: {folder} has a lock from {_describe(old)}, another machine, which "
                                 f"cannot be checked from here; if that run has ended, delete {path}")
            log.warning("%s: stale lock of %s taken over (that process ended without releasing it)",
                        folder, _describe(old))
        info = {"pid": os.getpid(), "host": host, "started": utc_now(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield folder
        finally:
            with suppress(OSError):
                os.unlink(path)  # still holding the flock, so no other writer is between these two steps
    finally:
        os.close(fd)


def writer(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock now (None: nobody); a lock from another machine counts as held."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        info = _holder(os.read(fd, 1 << 16))
        busy = info.get("host") not in (None, socket.gethostname()) or _busy(fd)
        return _describe(info) if busy else None
    finally:
        os.close(fd)  # drops the flock _busy may have taken


# ---------------------------------------------------------------------------------------------- identity


def _text(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), default=str)


def grid_sha256(grid: dict[str, Any], listed: bool = False) -> str:
    """SHA-256 of a sweep's case grid with its lists sorted (``listed``: in the spec's order, as older folders)."""
    canon = grid if listed else {k: sorted(v, key=_text) if isinstance(v, list) else v for k, v in grid.items()}
    return hashlib.sha256(_text(canon).encode()).hexdigest()


def identity(grid: dict[str, Any], options: dict[str, Any], version: str) -> dict[str, Any]:
    """A new sweep's ``run.json``: a fresh ``run_id`` (its second stages' records carry it), grid hash, options."""
    return {"kind": "sweep", "run_id": uuid.uuid4().hex, "command": envinfo.command_line(),
            "spec_sha256": grid_sha256(grid), "options": dict(options), "overlap_bench": version,
            "created": utc_now(), "host": socket.gethostname(), "resumes": []}


def read_identity(folder: str | os.PathLike, strict: bool = True) -> dict[str, Any] | None:
    """``run.json`` of ``folder`` (None: it has none); ``strict``: a sweep's identity, with its options."""
    path = Path(folder) / IDENTITY
    fh = open_regular(path)
    if fh is None:
        return None
    with fh:
        try:
            doc = json.loads(fh.read())
        except ValueError as exc:
            raise UserError(f"--out: {path} is unreadable ({type(exc).__name__}); restore it or choose "
                            "another folder") from None
    if not (isinstance(doc, dict) and (isinstance(doc.get("options"), dict) or not strict)):
        raise UserError(f"--out: {path} is not a run identity (no options mapping); restore it or choose "
                        "another folder")
    return doc


def _diffs(old: dict[str, Any], new: dict[str, Any], known_only: bool = False) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
                     if old.get(k) != v and (k in old or not known_only))


def check_identity(folder: Path, new: dict[str, Any], *, has_records: bool, force: bool,
                   records_options: list[dict[str, Any]] | None = None, listed_sha256: str = "") -> dict[str, Any]:
    """The identity to write: ``new`` without records, else the folder's own with this resume appended. Another
    spec or options (``records_options`` where there is no run.json; ``listed_sha256``: the spec hashed as older
    folders were) raise :class:`UserError` unless ``force``."""
    if not has_records:  # nothing measured yet (or a run that ended before its first record): start afresh
        return new
    old = read_identity(folder)
    if old is None:
        diffs = (_diffs(opts, new["options"], known_only=True) for opts in records_options or [])
        why = next((f"its records were measured with other options ({d})" for d in diffs if d), None)
        old = dict(new, adopted=utc_now(), note="run.json added on resume; the folder had none",
                   stamped_since=utc_now())  # its records so far carry no run stamp
    elif old.get("spec_sha256") not in (new["spec_sha256"], listed_sha256):
        why = "it was made by another spec (its case grid differs)"
    else:
        why = _diffs(old["options"], new["options"]) or None
        why = why and f"its options differ ({why})"
    if why and not force:
        raise UserError(f"--resume: {folder} cannot be resumed with this spec: {why}; use the spec and "
                        "options it was made with, a new --out, or --force to mix them knowingly")
    if "run_id" not in old:
        old.update(run_id=new["run_id"], stamped_since=utc_now())  # its records so far carry no run stamp
    old.setdefault("resumes", []).append({"time": utc_now(), "host": socket.gethostname(),
                                          "spec_sha256": new["spec_sha256"], "options": new["options"],
                                          "overlap_bench": new["overlap_bench"], "forced": bool(why)})
    return old
