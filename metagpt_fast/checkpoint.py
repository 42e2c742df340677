"""Checkpoints that survive crashes: written atomically and verified on load.

File layout: ``MAGIC`` (8 bytes) + SHA-256 of the payload (32 bytes) + the ``torch.save`` payload. Writing goes to a
temporary file in the same folder, is fsynced, then renamed over the target (atomic on POSIX), and the folder is
fsynced, so a crash at any point leaves either the previous checkpoint or the new one — never a torn file. Loading
checks the magic and the checksum first, so a truncated or corrupted file is rejected with a clear error.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

MAGIC = b"MGFCKPT1"
_HEADER = len(MAGIC) + hashlib.sha256().digest_size


class CheckpointError(ValueError):
    """The file is not a valid metagpt_fast checkpoint (truncated, corrupted, or another format)."""


def save(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a metagpt_fast checkpoint (bad header; truncated or another format)")
    digest, payload = data[len(MAGIC) : _HEADER], data[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupt: checksum mismatch (truncated or modified after writing)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
