"""Results as packed records: how a pool worker hands results back, priced per chunk.

A result of the common kind (no details but where its RTT came from) is a fixed 26-byte record:
key, outcome flags, failure code, RTT, send time, decoded in bulk with `struct.iter_unpack`. A
result with more to say travels as a row (a tuple, pickled with its frame). The key says which
target it is; the reader owns the Target objects, so none travels.

`Records` is the writing side. A prober that can produce records without building a
ProbeResult first (icmp.IcmpProber.probe_keyed) calls `answered`/`ended`; anything else goes
through `result`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.base import Failure, ProbeResult

# key, flags (bit 0 reachable, bit 1 success, bits 2-3 the details: none, or rtt_source
# kernel / loop), failure code (an index in _FAILURE_CODES), RTT (NaN: none), sent at.
RECORD = struct.Struct("<qBBdd")
# The same layout as a numpy record, for engines that make records in bulk.
RECORD_DTYPE = np.dtype(
    [("key", "<i8"), ("flags", "u1"), ("failure", "u1"), ("rtt", "<f8"), ("sent", "<f8")]
)
assert RECORD_DTYPE.itemsize == RECORD.size
_FAILURE_CODES: tuple[Failure | None, ...] = (None, *Failure)
_FAILURE_CODE = {failure: code for code, failure in enumerate(_FAILURE_CODES)}
_RTT_SOURCES: tuple[str | None, ...] = (None, "kernel", "loop")
_RTT_SOURCE_CODE = {"kernel": 1, "loop": 2}
# flags -> (reachable, success, rtt_source or None)
_OUTCOMES = [
    (bool(flags & 1), bool(flags & 2), _RTT_SOURCES[flags >> 2] if flags >> 2 < 3 else None)
    for flags in range(16)
]
_FAILURES_BY_NAME = {str(f): f for f in Failure}

# A result not packed: (key, reachable, success, failure name or None, rtt_s, started_at,
# details).
Row = tuple[int, bool, bool, str | None, float | None, float, dict[str, Any]]
# A result read back: (key, reachable, success, failure, rtt_s, started_at, details).
Decoded = tuple[int, bool, bool, Failure | None, float | None, float, dict[str, Any]]


def decode(packed: bytes, rows: list[Row]) -> Iterator[Decoded]:
    """Every result of one hand-over, the packed ones (in bulk) first."""
    for key, flags, failure, rtt, started_at in RECORD.iter_unpack(packed):
        reachable, success, rtt_source = _OUTCOMES[flags]
        details = {} if rtt_source is None else {"rtt_source": rtt_source}
        yield (key, reachable, success, _FAILURE_CODES[failure], None if rtt != rtt else rtt,
               started_at, details)  # fmt: skip
    for key, reachable, success, name, rtt, started_at, details in rows:
        failure = None if name is None else _FAILURES_BY_NAME.get(name, Failure.OTHER)
        yield key, reachable, success, failure, rtt, started_at, details


class Records:
    """Results collected for one hand-over: packed records, and rows for the rest."""

    __slots__ = ("on_first", "packed", "rows")

    def __init__(self, on_first: Callable[[], object] | None = None) -> None:
        self.packed = bytearray()
        self.rows: list[Row] = []
        self.on_first = on_first  # called when a result comes in while this is empty

    def __bool__(self) -> bool:
        return bool(self.packed) or bool(self.rows)

    def _wake(self) -> None:
        if self.on_first is not None and not self.packed and not self.rows:
            self.on_first()

    def take(self) -> tuple[bytes, list[Row]]:
        """What was collected, leaving this empty."""
        taken = bytes(self.packed), self.rows
        self.packed.clear()
        self.rows = []
        return taken

    def answered(
        self,
        key: int,
        rtt: float,
        rtt_source: str,
        started_at: float,
        more: dict[str, Any] | None = None,
    ) -> None:
        """A target that answered; `more`: details besides where the RTT came from."""
        self._wake()
        if more:
            details = {"rtt_source": rtt_source, **more}
            self.rows.append((key, True, True, None, rtt, started_at, details))
        else:
            self.packed += RECORD.pack(
                key, 3 | _RTT_SOURCE_CODE[rtt_source] << 2, 0, rtt, started_at
            )

    def answered_many(
        self,
        keys: npt.NDArray[np.int64],
        rtts: npt.NDArray[np.float64],
        by_kernel: npt.NDArray[np.bool_],
        started_at: npt.NDArray[np.float64],
    ) -> None:
        """Targets that answered, in bulk; `by_kernel`: whether each RTT is the kernel's."""
        if len(keys):
            kernel, loop = (3 | _RTT_SOURCE_CODE[s] << 2 for s in ("kernel", "loop"))
            self._add_many(keys, np.where(by_kernel, kernel, loop), 0, rtts, started_at)

    def ended_many(
        self, keys: npt.NDArray[np.int64], failure: Failure, started_at: npt.NDArray[np.float64]
    ) -> None:
        """Targets with no answer and nothing more to say (timeouts), in bulk."""
        if len(keys):
            self._add_many(keys, 0, _FAILURE_CODE[failure], math.nan, started_at)

    def _add_many(
        self,
        keys: npt.NDArray[np.int64],
        flags: npt.NDArray[np.int64] | int,
        failure: int,
        rtts: npt.NDArray[np.float64] | float,
        started_at: npt.NDArray[np.float64],
    ) -> None:
        self._wake()
        out = np.empty(len(keys), RECORD_DTYPE)
        out["key"], out["flags"], out["failure"] = keys, flags, failure
        out["rtt"], out["sent"] = rtts, started_at
        self.packed += out.tobytes()

    def ended(
        self, key: int, failure: Failure, started_at: float, details: dict[str, Any]
    ) -> None:
        """A target with no answer (timeout, unreachable, blocked, ...)."""
        self._wake()
        if details:
            self.rows.append((key, False, False, str(failure), None, started_at, details))
        else:
            self.packed += RECORD.pack(key, 0, _FAILURE_CODE[failure], math.nan, started_at)

    def result(self, key: int, result: ProbeResult) -> None:
        """Any result: packed when its details are at most its RTT source, else a row."""
        self._wake()
        details = result.details
        source = 0
        if details:
            value = details.get("rtt_source")
            if len(details) == 1 and isinstance(value, str):
                source = _RTT_SOURCE_CODE.get(value, 0)
            if not source:  # more to say than the RTT source
                failure = None if result.failure is None else str(result.failure)
                self.rows.append((key, result.reachable, result.success, failure, result.rtt_s,
                                  result.started_at, details))  # fmt: skip
                return
        rtt = result.rtt_s
        self.packed += RECORD.pack(
            key, result.reachable | result.success << 1 | source << 2,
            _FAILURE_CODE[result.failure], math.nan if rtt is None else rtt, result.started_at,
        )  # fmt: skip
