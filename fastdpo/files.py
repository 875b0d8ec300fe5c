"""Files on disk, one way everywhere: the cache root, atomic writes, moving a bad file aside, the writability probe
and content digests. At the ground floor: imports nothing from the package."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash


def cache_root() -> Path:
    """$FASTDPO_CACHE, else ~/.cache/fastdpo. An empty value counts as unset (a relative "" would put caches in the
    current folder)."""
    return Path(os.environ.get("FASTDPO_CACHE") or Path.home() / ".cache" / "fastdpo").expanduser()


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a node crash, not only a killed process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a reader sees the old file or the
    new one, never half of one. durable: fsync the file before the rename and the folder after it."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync(path.parent)


def atomic_write(path: Path, text: str, durable: bool = True) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text), durable)


def write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write(Path(path), json.dumps(obj, indent=2) + "\n", durable)


def move_aside(path: Path, tag: str = "bad") -> str | None:
    """Rename a file or folder that cannot be used to `<name>.<tag>-<time>`, kept for a post-mortem; None when done,
    else why not (the caller says what it does instead)."""
    aside = path.with_name(f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
        return None
    except OSError as e:
        return f"cannot move it aside ({e})"


def probe_writable(folder: Path) -> str | None:
    """None if files can be created in folder (created if missing), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(name)
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """xxh3-128 of a file's bytes; remembered in memo_dir while its size, mtime, ctime and inode are unchanged."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = memo_dir / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json") if memo_dir else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return saved["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(memo, json.dumps({"path": str(path.resolve()), "stamp": stamp, "digest": digest}),
                         durable=False)
        except OSError:
            pass  # only an optimisation
    return digest
