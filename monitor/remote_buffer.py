"""A bounded on-disk queue of remote-write requests: segment files under one directory.

Every batch the daemon wants to send becomes one segment file, named by a growing sequence
number, written atomically (temporary file, fsync, rename), so a crash or a restart never
leaves half a batch and the sender replays the segments oldest first with their original
timestamps. When the directory would grow past `max_bytes`, the oldest segments are deleted
first and their samples counted as dropped: the newest data is the most useful to an operator
looking at an ongoing shutdown.

Segment layout: magic b"SMRW", version 1 (u8), samples (u32 LE), payload length (u32 LE),
CRC-32 of the payload (u32 LE), then the payload (a snappy-compressed WriteRequest). A segment
that does not match (torn by a full disk, edited by hand) is counted as corrupt and removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MAGIC: Final = b"SMRW"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sBIII")
SUFFIX: Final = ".seg"
_NAME: Final = re.compile(r"(\d{16})\.seg")


@dataclass(frozen=True, slots=True)
class Segment:
    """One buffered request: where it lives, how many samples it carries, its body."""

    sequence: int
    path: Path
    samples: int
    payload: bytes


def encode_segment(payload: bytes, samples: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, samples, len(payload), zlib.crc32(payload)) + payload


def decode_segment(data: bytes) -> tuple[int, bytes]:
    """(samples, payload) of a segment file's bytes; ValueError says what does not match."""
    if len(data) < HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, samples, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"expected magic {MAGIC!r} version {VERSION}, got {magic!r} {version}")
    payload = data[HEADER.size:]
    if len(payload) != length:
        raise ValueError(f"payload of {len(payload)} bytes, the header says {length}")
    if zlib.crc32(payload) != crc:
        raise ValueError("payload checksum mismatch")
    return samples, payload


class RemoteBuffer:
    """The queue for one remote-write destination. Not thread-safe: one event loop owns it."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes <= HEADER.size:
            raise ValueError(f"buffer_max_bytes: expected more than {HEADER.size}, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.dropped_samples = 0  # oldest-first evictions and batches too big to ever fit
        self.corrupt_segments = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        # sequence -> (path, samples, bytes on disk); headers are read once, at open.
        self._index: dict[int, tuple[Path, int, int]] = {}
        for leftover in self.directory.glob("*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()  # a crash mid-write: the batch was never acknowledged
        for path in sorted(self.directory.iterdir()):
            match = _NAME.fullmatch(path.name)
            if match is None:
                continue
            samples = self._read_header(path)
            if samples is not None:
                self._index[int(match.group(1))] = (path, samples, path.stat().st_size)
        self._next = max(self._index, default=-1) + 1

    def _read_header(self, path: Path) -> int | None:
        try:
            with path.open("rb") as handle:
                head = handle.read(HEADER.size)
            magic, version, samples, length, _crc = HEADER.unpack(head)
            if magic != MAGIC or version != VERSION or path.stat().st_size != HEADER.size + length:
                raise ValueError("bad header or truncated")
            return int(samples)
        except (OSError, ValueError, struct.error) as exc:
            self._discard_corrupt(path, str(exc))
            return None

    def _discard_corrupt(self, path: Path, why: str) -> None:
        self.corrupt_segments += 1
        log.error("remote write buffer: %s is corrupt (%s): removed", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    @property
    def samples_buffered(self) -> int:
        return sum(samples for _, samples, _ in self._index.values())

    @property
    def bytes_buffered(self) -> int:
        return sum(size for _, _, size in self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def append(self, payload: bytes, samples: int) -> None:
        """Store one request durably; evict the oldest segments if the cap needs it."""
        data = encode_segment(payload, samples)
        if len(data) > self.max_bytes:
            self.dropped_samples += samples
            log.error("remote write buffer: a batch of %d bytes exceeds buffer_max_bytes %d: "
                      "dropped", len(data), self.max_bytes)
            return
        self._evict(self.max_bytes - len(data))
        sequence = self._next
        self._next += 1
        path = self.directory / f"{sequence:016d}{SUFFIX}"
        temporary = path.with_suffix(".tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        self._index[sequence] = (path, samples, len(data))

    def _evict(self, room: int) -> None:
        total = self.bytes_buffered
        for sequence in sorted(self._index):
            if total <= room:
                break
            path, samples, size = self._index.pop(sequence)
            total -= size
            self.dropped_samples += samples
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("remote write buffer full: dropped the oldest segment (%d samples)",
                        samples)

    def oldest(self) -> Segment | None:
        """The oldest readable segment (corrupt ones on the way are counted and removed)."""
        while self._index:
            sequence = min(self._index)
            path, _, _ = self._index[sequence]
            try:
                stored_samples, payload = decode_segment(path.read_bytes())
            except (OSError, ValueError) as exc:
                del self._index[sequence]
                self._discard_corrupt(path, str(exc))
                continue
            return Segment(sequence, path, stored_samples, payload)
        return None

    def remove(self, segment: Segment) -> None:
        """The segment was delivered (or rejected for good): forget it."""
        if self._index.pop(segment.sequence, None) is not None:
            with contextlib.suppress(OSError):
                segment.path.unlink()
