"""The run folder: every file name in it, the one way files are written there (:class:`RunFolder`: fsync'd
appends for JSON-lines logs, atomic replacement for the rest), one writer at a time (:func:`lock`, ``run.lock``,
an ``flock`` the kernel drops when its holder dies) and a recorded identity (``run.json``,
:func:`check_identity`), so that ``--resume`` never mixes two runs silently."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from overlap_bench import envinfo
from overlap_bench.envinfo import utc_now
from overlap_bench.errors import UserError, describe_os_error
from overlap_bench.records import CONFIRM, RECORDS, Loaded, json_safe, load_records

log = logging.getLogger("overlap_bench.runfolder")

# Every file name of a run folder (the two record logs, RECORDS and CONFIRM, are named in records).
LOCK = "run.lock"
IDENTITY = "run.json"
ENV = "env.json"
SPEC = "spec.yaml"
SUMMARY = "summary.md"
TABLES_MD, TABLES_CSV = "tables.md", "tables.csv"
MODEL = "model.jsonl"
"""The model benchmark's records (``kind: model``), one per (M, mode), rewritten whole after each M."""
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"
INTERFERENCE_MD, INTERFERENCE_CSV = "interference.md", "interference.csv"
PREDICTION_MD, PREDICTION_JSON = "prediction.md", "prediction.json"


def plot_name(kind: str, slug: str) -> str:
    """A plot's file name: ``<kind>_<slug>.png`` (kind: speedup, eta, breakdown, slowdown)."""
    return f"{kind}_{slug}.png"


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it is fsync'd, given the usual mode (mkstemp makes
    0600) and renamed over ``path``, so readers never see half a file; on any error it is removed. The one
    writer of whole files, inside a run folder (:class:`RunFolder`) or not (a policy, a markdown report)."""
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
    """One run folder and every write into it: JSON-lines logs are appended one fsync'd line at a time
    (a crash loses at most the line in flight; a torn last line is ended before the next append), every
    other file is replaced atomically. File names are this module's constants."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ended: set[str] = set()  # logs whose torn last line was already ended this session

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    __str__ = __fspath__  # str(folder) is its path, as for a Path (it is passed where paths are expected)

    def lock(self, flag: str = "--out", command: str = ""):
        """Hold the folder's ``run.lock`` while the block runs (:func:`lock`)."""
        return lock(self.path, flag, command)

    def write_text(self, name: str, text: str) -> Path:
        """Replace ``name`` with ``text`` atomically; returns its path."""
        write_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, doc: Any) -> Path:
        """Replace ``name`` with ``doc`` as indented strict JSON (NaN as null)."""
        return self.write_text(name, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")

    def open_atomic(self, name: str, mode: str = "w"):
        """A file object whose content replaces ``name`` when the block ends without error."""
        return atomic_file(self.path / name, mode)

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as PNG under ``name``, atomically."""
        with self.open_atomic(name, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        return self.path / name

    def write_env(self, command: str | None = None) -> dict[str, Any]:
        """Write ``env.json`` (the machine, library versions, commit) and return it."""
        env = envinfo.collect(command) if command is not None else envinfo.collect()
        self.write_json(ENV, env)
        return env

    def append(self, record: Any, name: str = RECORDS) -> None:
        """Append one record (anything with ``to_json()``) to the log ``name`` as one fsync'd line."""
        path = self.path / name
        if name not in self._ended:
            path.parent.mkdir(parents=True, exist_ok=True)
            _end_torn_line(path)
            self._ended.add(name)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(record.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_records(self, records: list[Any], name: str) -> Path:
        """Replace the log ``name`` with ``records`` at once (a table rebuilt whole, e.g. the model's)."""
        return self.write_text(name, "".join(r.to_json() + "\n" for r in records))

    def load(self, name: str = RECORDS) -> Loaded:
        """The records of the log ``name`` (``records.load_records``: torn lines skipped and listed)."""
        return load_records(self.path, name)


def _end_torn_line(path: Path) -> None:
    # A line torn by a crash must not glue onto the next record: end the file with a newline.
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b"\n":
            with open(path, "ab") as fh:
                fh.write(b"\n")


class FolderBusy(UserError):
    """Another process writes this run folder (or a lock from another host cannot be checked)."""


class FolderMismatch(UserError):
    """``--resume`` into a folder made with another spec or other timing options."""


def ensure_folder(path: Path, flag: str) -> Path:
    """Create ``path`` (and parents) as a folder; an existing file, a read-only parent, a name too long
    and the like become one :class:`UserError` line naming ``flag``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag}: {path} exists and is not a folder; give a folder path") from None
    except OSError as exc:
        raise UserError(f"{flag}: {describe_os_error(exc)}; give a folder you can write") from None
    return path


def _holder(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (starting up)"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}: {info.get('command')})"


@contextmanager
def lock(folder: str | os.PathLike, flag: str = "--out", command: str = "") -> Iterator[Path]:
    """Hold ``folder/run.lock`` exclusively while the block runs (the folder is created first).

    A second writer gets :class:`FolderBusy` (exit 2) naming the holder. A lock file whose holder is gone
    (its process was killed) is reported as stale with a warning and taken over. A lock file written on
    another host cannot be checked from here (``flock`` need not reach across machines), so it is refused
    with the path to delete once that run has ended.
    """
    folder = ensure_folder(Path(folder), flag)
    path = folder / LOCK
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{flag}: {describe_os_error(exc)}; give a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            info = _holder(path.read_text(encoding="utf-8", errors="replace") if path.exists() else "")
            raise FolderBusy(f"{flag}: {folder} is being written by {_describe(info)}; wait for it to end "
                             "or choose another folder") from None
        try:  # the previous holder may have removed the file between our open and our flock: retry
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        old = _holder(os.read(fd, 1 << 16).decode("utf-8", errors="replace"))
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
            try:
                os.unlink(path)  # still holding the flock, so no other writer is between these two steps
            except OSError:
                pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- identity


def grid_hash(grid: dict[str, Any]) -> str:
    """SHA-256 of a JSON-able mapping in canonical form (sorted keys), e.g. a spec's case grid."""
    text = json.dumps(grid, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def identity(grid: dict[str, Any], options: dict[str, Any], version: str) -> dict[str, Any]:
    """What ``run.json`` holds at creation: the grid's hash, the options, the tool version, the time."""
    return {"spec_sha256": grid_hash(grid), "options": dict(options), "overlap_bench": version,
            "created": utc_now(), "host": socket.gethostname(), "resumes": []}


def read_identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``run.json`` of ``folder``, or None when it has none (a folder made before run.json existed)."""
    path = Path(folder) / IDENTITY
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--out: {path} is unreadable ({type(exc).__name__}); restore it or choose "
                        "another folder") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("options"), dict):
        raise UserError(f"--out: {path} is not a run identity (no options mapping); restore it or choose "
                        "another folder")
    return doc


def mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How identity ``new`` differs from ``old`` (one phrase), or None when they describe the same run."""
    if old.get("spec_sha256") != new["spec_sha256"]:
        return "it was made by another spec (its case grid differs)"
    diffs = [f"{k} {old['options'].get(k)!r} -> {v!r}" for k, v in new["options"].items()
             if old["options"].get(k) != v]
    return f"its options differ ({', '.join(diffs)})" if diffs else None


def check_identity(folder: Path, new: dict[str, Any], *, has_records: bool, force: bool,
                   records_options: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The identity to write for a run in ``folder``: ``new`` for a fresh folder, else the folder's own with
    this resume appended. A resume with another spec or other options raises :class:`FolderMismatch`
    unless ``force``. A folder without ``run.json`` (older version) is checked against the options its
    records carry (``records_options``: one mapping per record, keys as in ``new['options']``)."""
    old = read_identity(folder)
    if not has_records:  # nothing measured yet (or a run that ended before its first record): start afresh
        return new
    if old is None:
        why = None
        for opts in records_options or []:
            diffs = [f"{k} {opts[k]!r} -> {v!r}" for k, v in new["options"].items() if k in opts and opts[k] != v]
            if diffs:
                why = f"its records were measured with other options ({', '.join(diffs)})"
                break
        old = dict(new, adopted=utc_now(), note="run.json added on resume; the folder had none")
    else:
        why = mismatch(old, new)
    if why and not force:
        raise FolderMismatch(f"--resume: {folder} cannot be resumed with this spec: {why}; use the spec and "
                             "options it was made with, a new --out, or --force to mix them knowingly")
    old.setdefault("resumes", []).append({"time": utc_now(), "host": socket.gethostname(),
                                          "spec_sha256": new["spec_sha256"], "options": new["options"],
                                          "overlap_bench": new["overlap_bench"], "forced": bool(why)})
    return old
