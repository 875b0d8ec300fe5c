"""Files of the data path: atomic writes and content digests (below sources; the caches build on it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """xxh3-128 of a file's bytes; remembered in memo_dir while its size, mtime, ctime and inode are unchanged."""
    import xxhash

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
            atomic_write(memo, json.dumps({"path": str(path.resolve()), "stamp": stamp, "digest": digest}))
        except OSError:
            pass  # only an optimisation
    return digest
