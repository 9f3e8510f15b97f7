"""An artifact as one unit: writing it (a hidden folder renamed into place, its manifest
and file hashes), reading its plan back, and verifying its files. Build, transition and
extend all write through ``write_atomically`` and ``manifest``.

Putting a folder in place never loses data:

* one writer per target: an advisory lock (``.NAME.lock`` beside the target) is held
  from the first byte written to the rename, so a second build to the same path stops
  at once with a message naming the first one;
* no silent replacement: without ``force``, the rename refuses a target that appeared
  during the build (``renameat2(RENAME_NOREPLACE)`` on Linux, ``renamex_np`` on macOS;
  a check under the lock elsewhere); with ``force``, a target is replaced only if it is
  a moecompose artifact, swapped atomically where the system allows;
* nothing left behind: temporary folders are named after their writer
  (``.NAME.partial-HOST-PID-START``), so a later build removes those of writers that died
  (``kill -9``), and only those: never another host's, never a live process's.

This module imports no torch: the front end reads plans with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from moecompose.errors import BuildError, ResourceError, SourceError
from moecompose.files import read_json_file
from moecompose.plan.recipe import Plan

T = TypeVar("T")
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)
DOMAINS_FILE = "domains.safetensors"


@dataclass(frozen=True)
class BuildResult:
    path: Path
    files: dict[str, str]  # file name -> sha256
    bytes: int
    warnings: tuple[str, ...] = ()  # found while building (e.g. nearly parallel router rows)

_NOREPLACE, _EXCHANGE = 1, 2  # renameat2 flags (Linux)
_MAC_SWAP, _MAC_EXCL = 0x2, 0x4  # renamex_np flags (macOS)
_AT_FDCWD = -100
_OWNER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)$")
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _me() -> str:
    """``HOST-PID-START``: names this process unambiguously (a pid can be reused)."""
    start = int(psutil.Process().create_time() * 1000)
    return f"{_host()}-{os.getpid()}-{start}"


def _alive(pid: int, start: int) -> bool:
    try:
        return int(psutil.Process(pid).create_time() * 1000) == start
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:
        return True  # cannot tell: keep it


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders of dead writers of ``out`` (on this host); a
    half-swapped ``.old`` folder whose target is missing is put back. Returns what was
    removed or restored."""
    if not out.parent.is_dir():
        return []
    host, done = _host(), []
    for path in out.parent.iterdir():
        match = _OWNER.match(path.name)
        if not match or match["name"] != out.name or match["host"] != host:
            continue
        if _alive(int(match["pid"]), int(match["start"])):
            continue
        if match["kind"] == "old" and not out.exists():
            path.rename(out)  # the swap died between its two renames: keep the old artifact
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the advisory lock of ``out`` (``.NAME.lock`` beside it) or fail at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the rename checks still apply
        yield
        return
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BuildError(
                f"another build is writing {out} ({holder})",
                hint="wait for it to finish, or choose another output folder",
            ) from None
        if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
            break
        os.close(fd)  # the lock file was replaced while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _rename_call(src: Path, dst: Path, flags: int) -> bool:
    """rename with ``flags`` (Linux ``RENAME_*`` meaning); False when the system or the
    file system lacks it. Raises ``OSError`` for a refusal such as ``EEXIST``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    elif platform.system() == "Darwin" and hasattr(libc, "renamex_np"):
        mac = {_NOREPLACE: _MAC_EXCL, _EXCHANGE: _MAC_SWAP}[flags]
        rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), mac)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _appeared(out: Path) -> BuildError:
    return BuildError(
        f"output {out} appeared while the build ran; it was left as it is",
        hint="pass --force to replace it, or choose another output folder",
    )


def check_output(out: Path, force: bool, protected: dict[str, Path]) -> None:
    """Refuse an output folder that overlaps a ``protected`` folder (what is read), that
    exists (without ``force``), or that exists and is not a moecompose artifact."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} is a file", hint="choose a folder path for the artifact")
    for what, folder in protected.items():
        folder = folder.resolve()
        if out == folder or folder.is_relative_to(out) or out.is_relative_to(folder):
            raise BuildError(
                f"output {out} overlaps {what} ({folder})",
                hint="choose an output folder outside what is read",
            )
    if out.exists() and not force:
        raise BuildError(f"output {out} already exists", hint="pass --force to replace it")
    if out.exists() and not (out / "plan.json").is_file() and any(out.iterdir()):
        raise BuildError(
            f"output {out} exists and is not a moecompose artifact",
            hint="refusing to replace it even with --force; choose another folder",
        )


def put_in_place(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``; see the module docstring."""
    if not force:
        try:
            if _rename_call(tmp, out, _NOREPLACE):
                return
        except FileExistsError:
            raise _appeared(out) from None
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise _appeared(out) from None
            raise
        if out.exists():
            raise _appeared(out)
        tmp.rename(out)
        return
    check_output(out, True, {})  # what appeared meanwhile is replaced only if ours
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{_me()}"
    if _rename_call(tmp, out, _EXCHANGE):
        tmp.rename(old)  # tmp now holds the replaced artifact
    else:
        out.rename(old)
        tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_atomically(out: Path, fill: Callable[[Path], T], *, force: bool) -> T:
    """Run ``fill`` on a hidden temporary folder beside ``out``, then put it in place of
    ``out``. On any failure (SIGINT and SIGTERM included) the temporary folder is removed
    and ``out`` is untouched; folders made to hold ``out`` are removed again."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, out) from None
        with output_lock(out):
            remove_stale(out)
            tmp = out.parent / f".{out.name}.partial-{_me()}"
            try:
                tmp.mkdir()
                result = fill(tmp)
                put_in_place(tmp, out, force=force)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise write_error(exc, out) from None
                raise
    except BaseException:
        for folder in made:  # innermost first; only what is still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def write_error(exc: OSError, out: Path) -> BuildError:
    """A located one-line error for a failed write of ``out``: a full disk, a quota or a
    permission is a ``ResourceError`` (the machine, not the input)."""
    where = exc.filename or out
    if exc.errno in _SPACE_ERRORS:
        try:
            free = f", {shutil.disk_usage(out.parent).free:,} bytes free in {out.parent}"
        except OSError:
            free = ""
        return ResourceError(
            f"cannot write {out}: {exc.strerror or exc}{free}",
            hint="free some space or write the artifact to another disk",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError(
            f"cannot write {out}: {where}: {exc.strerror or exc}",
            hint="choose an output folder you can write to",
        )
    return BuildError(f"cannot write {out}: {where}: {exc.strerror or exc}")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the output's file system has less room than ``needed``
    bytes (the plan knows them all)."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise ResourceError(
            f"cannot write {out}: the artifact needs {needed:,} bytes, {folder} has {free:,} free",
            hint="free some space or write the artifact to another disk",
        )


def check_target(plan: Plan, out: Path, force: bool) -> None:
    """Refuse an output that overlaps what ``plan`` reads, exists (without ``force``), or
    is not ours."""
    what = {"artifact": "the artifact it derives from", "checkpoint": "the checkpoint it copies"}
    sources = {what.get(src.get("kind", ""), f"source '{name}'"): Path(src["path"])
               for name, src in plan.sources.items()}
    check_output(Path(out), force, sources)


def write_text(path: Path, text: str) -> str:
    """Write ``text`` as UTF-8; returns its sha256."""
    data = text.encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


HASH_CACHE_FORMAT = 1


def hash_cache_path() -> Path:
    """Where source-file hashes are remembered: ``$MOECOMPOSE_CACHE_DIR/file-hashes.json``,
    else under ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/moecompose/``."""
    root = os.environ.get("MOECOMPOSE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "file-hashes.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moecompose" / "file-hashes.json"


def _file_key(path: Path) -> str | None:
    """What identifies a file's bytes without reading them (as make and git trust): its
    resolved path, device, inode, size, and modification and change times in ns."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def source_hashes(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, read from the hash cache when the file's key (path, inode,
    size, times) is unchanged since it was hashed, else computed and remembered. A manifest
    lists every source file's hash; without the cache a build reads every source file a
    second time for it. A cache that cannot be read or written is ignored."""
    cache_file = hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
        if cache.get("format") != HASH_CACHE_FORMAT or not isinstance(cache.get("files"), dict):
            cache = {}
    except (OSError, ValueError, AttributeError):
        cache = {}
    known: dict[str, str] = dict(cache.get("files", {}))
    out, changed = {}, False
    for path in paths:
        key = _file_key(path)
        digest = known.get(key) if key is not None else None
        if not isinstance(digest, str):
            digest = sha256_file(path)
            if key is not None:
                known[key] = digest
                changed = True
        out[path] = digest
    if changed:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"format": HASH_CACHE_FORMAT, "files": known}))
            tmp.replace(cache_file)
    return out


class SourceHashes:
    """`source_hashes` of every weights file of ``plan``'s inputs, computed on a thread of
    its own from construction on, so that a build's first pass over a new source (a cold
    hash cache) overlaps the build instead of following it: ``hashlib`` and file reads
    release the GIL, and the build's arithmetic runs on one core. ``result()`` waits for it
    and raises what the hashing raised. The thread is a daemon: a failed build exits
    without waiting for it."""

    def __init__(self, plan: Plan) -> None:
        self.files = {name: sorted(Path(src["path"]).glob("*.safetensors"))
                      for name, src in plan.sources.items()}
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="source-hashes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._hashes = source_hashes([f for files in self.files.values() for f in files])
        except OSError as exc:  # a source, not the output: say which
            self._error = SourceError(f"cannot read {exc.filename or 'a source file'}: "
                                      f"{exc.strerror or exc}",
                                      hint="check that the source's files are readable")
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> dict[str, dict[str, str]]:
        """Input name -> weights file name -> sha256."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {name: {f.name: self._hashes[f] for f in files}
                for name, files in self.files.items()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("moecompose", "torch", "safetensors", "pydantic"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def manifest(plan: Plan, files: dict[str, str],
             inputs: SourceHashes | None = None) -> dict[str, Any]:
    """manifest.json: versions, the plan's digest, every input's weight hashes (``inputs``,
    started earlier, or computed now) and the artifact's own file hashes; a derived
    artifact also names what it was derived from."""
    hashes = (inputs or SourceHashes(plan)).result()
    sources = {
        name: {"path": src["path"], "fingerprint": src["fingerprint"], "files": hashes[name]}
        for name, src in plan.sources.items()
    }
    out: dict[str, Any] = {
        "moecompose_manifest": 1,
        "versions": versions(),
        "plan_digest": plan.digest(),
        "format": plan.format,
        "sources": sources,
    }
    if plan.derivations:
        out["derived_from"] = plan.derivations[-1]
    out["files"] = dict(sorted(files.items()))
    return out


def read_json(artifact: Path, name: str) -> dict[str, Any]:
    """An artifact's JSON file ``name`` (config.json, plan.json, ...): an object, read
    with the bounds of every file a user names; a missing, unreadable or corrupted one is
    a one-line error."""
    path = artifact / name
    if not path.exists():
        raise BuildError(f"{artifact} has no {name}", hint="is this a moecompose artifact?")
    try:
        data = read_json_file(path)
    except OSError as exc:
        raise BuildError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        data = exc
    if not isinstance(data, dict):
        what = data if isinstance(data, ValueError) else "not a JSON object"
        raise BuildError(f"{path} is corrupted: {what}",
                         hint="rebuild the artifact, or restore the file")
    return data


def read_plan(artifact: Path) -> Plan:
    """The plan an artifact was written from (its plan.json)."""
    data = read_json(artifact, "plan.json")
    try:
        return Plan.from_data(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BuildError(f"{artifact / 'plan.json'} is corrupted: {exc}",
                         hint="rebuild the artifact, or restore the file") from None


def verify_files(artifact: Path) -> list[str]:
    """Files whose sha256 differs from manifest.json (or that are missing)."""
    manifest_data = read_json(artifact, "manifest.json")
    try:
        listed = {str(name): str(digest) for name, digest in manifest_data["files"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise BuildError(f"{artifact / 'manifest.json'} is corrupted: {exc}") from None
    bad = []
    for name, digest in listed.items():
        if not (artifact / name).is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(artifact / name) != digest:
            bad.append(f"{name} (changed)")
    return bad


def stored_domains(plan: Plan, artifact: Path) -> dict[str, dict[str, Any]]:
    """``plan.domains`` read back from ``artifact``'s domains.safetensors (each domain's
    first provenance kept under ``from``): what a plan derived from an artifact embeds
    with, since the texts may be gone."""
    if not plan.domains:
        return {}
    from moecompose.sources.vectors import files_fingerprint

    vectors = artifact / DOMAINS_FILE
    fingerprint = files_fingerprint([vectors])
    return {name: {"kind": "embedding", "path": str(vectors), "key": name,
                   "fingerprint": fingerprint, "from": d}
            for name, d in plan.domains.items()}
