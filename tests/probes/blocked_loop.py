"""A busy daemon's event loop, for the RTT tests: blocked right after the last probe went out.

Every prober reads its answers on the event loop; a daemon's loop is sometimes busy for a
while (a history flush, the detector). `then_block(items)` hands the items to a prober and,
once it asks for the next one (every probe is out), blocks the loop for BLOCK_S: the answers
wait in the kernel meanwhile, and an honest RTT must not contain that wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

BLOCK_S = 0.3
# Far below BLOCK_S, far above a loopback RTT (microseconds) on a busy machine.
HONEST_BOUND_S = 0.05


def then_block(items: Iterable[T]) -> Iterator[T]:
    """Yield `items`; once they are all taken, block the running event loop for BLOCK_S."""
    yield from items
    asyncio.get_running_loop().call_soon(time.sleep, BLOCK_S)
