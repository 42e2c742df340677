"""Byte-level text corpora for training MetaGPT.

The default corpus exists on every machine: the Python standard library's own ``.py`` sources, read as bytes in a
fixed order (a code-generation model, one of the original article's use cases). ``--data PATH`` takes any text file
or folder instead. Tokens are bytes (vocab 256), so no tokenizer has to be downloaded.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 8 * 2**20  # 8 MiB of the standard library: far more than a CPU run consumes
FILE_SEPARATOR = b"\n\n"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".cpp", ".cu", ".json", ".toml", ".yaml", ".yml", ".js"}


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files (site-packages and tests excluded), sorted for a stable corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    raise FileNotFoundError(f"--data: no such file or folder: {path}")


def read_corpus(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Concatenated bytes of the corpus at ``path`` (default: the standard library), at most ``max_bytes``."""
    files = stdlib_sources() if path is None else text_files(Path(path))
    chunks, total = [], 0
    for file in files:
        data = file.read_bytes()
        chunks.append(data + FILE_SEPARATOR)
        total += len(data) + len(FILE_SEPARATOR)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 2:
        raise ValueError(f"--data: corpus at {path or 'stdlib'} has fewer than 2 bytes of text")
    return corpus


def encode(text: str | bytes) -> torch.Tensor:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def read_documents(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
    """The corpus of :func:`read_corpus` as its documents (one per file, each with its separator), in order."""
    files = stdlib_sources() if path is None else text_files(Path(path))
    documents, total = [], 0
    for file in files:
        data = (file.read_bytes() + FILE_SEPARATOR)[: max_bytes - total]
        if data:
            documents.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 2:
        raise ValueError(f"--data: corpus at {path or 'stdlib'} has fewer than 2 bytes of text")
    return documents


@dataclasses.dataclass
class Splits:
    train: torch.Tensor  # int64 byte ids
    val: torch.Tensor
    # Where each document starts (int64 token indices, ascending, 0 first), for packed batches; None: unknown.
    train_starts: torch.Tensor | None = None
    val_starts: torch.Tensor | None = None

    @classmethod
    def from_documents(cls, documents: list[bytes], val_fraction: float = 0.05, min_len: int = 2) -> Splits:
        """:meth:`from_bytes` of the concatenated documents, keeping their starts (the held-out part starts a
        document at its first token)."""
        splits = cls.from_bytes(b"".join(documents), val_fraction, min_len)
        lengths = torch.tensor([len(d) for d in documents], dtype=torch.int64)
        starts = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]))
        n_train = len(splits.train)
        splits.train_starts = starts[starts < n_train]
        splits.val_starts = torch.cat((torch.zeros(1, dtype=torch.int64), starts[starts > n_train] - n_train))
        return splits

    @classmethod
    def from_bytes(cls, corpus: bytes, val_fraction: float = 0.05, min_len: int = 2) -> Splits:
        tokens = encode(corpus)
        n_val = max(min_len, int(len(tokens) * val_fraction))
        if len(tokens) - n_val < min_len:
            raise ValueError(f"corpus of {len(tokens)} bytes is too small to split into train and validation")
        return cls(tokens[:-n_val], tokens[-n_val:])


def batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``, drawn with ``generator`` (resumable)."""
    seq_len = min(seq_len, len(tokens) - 1)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[index]
    return windows[:, :-1], windows[:, 1:]


def packed_batch(tokens: torch.Tensor, starts: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """:func:`batch`'s random windows, with the documents inside each window kept apart: returns inputs ``(B, T)``,
    targets ``(B, T)`` (-1, ignored, where the next token starts another document: no document predicts the next
    one's first byte) and the :class:`metagpt_fast.nn.PackedSequences` (each row starts a document; positions restart
    at every document start), so attention never crosses a document boundary."""
    from metagpt_fast.nn.attention import PackedSequences

    seq_len = min(seq_len, len(tokens) - 1)
    first = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    index = first[:, None] + torch.arange(seq_len + 1)
    windows = tokens[index]
    begins = torch.isin(index, starts)  # (B, T + 1): the token starts a document
    begins[:, 0] = True  # a row is a document boundary too
    targets = windows[:, 1:].masked_fill(begins[:, 1:], -1)
    begins = begins[:, :-1]
    t = torch.arange(seq_len).expand(batch_size, -1)
    last_start = torch.where(begins, t, torch.zeros_like(t)).cummax(dim=1).values
    flat = begins.flatten().nonzero().view(-1)
    cu_seqlens = torch.cat((flat, torch.tensor([begins.numel()]))).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    return windows[:, :-1], targets, PackedSequences(cu_seqlens, max_seqlen, t - last_start)
