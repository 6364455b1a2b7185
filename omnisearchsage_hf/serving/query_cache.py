"""A query-embedding cache in front of the query tower: TTL, memory bound, single-flight, micro-batched misses.

Search queries are Zipf-distributed: a few queries make most of the traffic, so a long-lived cache
answers nearly every request and the model only sees the tail (paper §3.6: 300k requests/s served with
~500 model queries/s behind a 30-day cache). This module is that cache, for one asyncio event loop:

- a hit is a dict lookup on the event loop (no thread hop, no model);
- a miss joins the queue of the batch worker; concurrent requests for the same uncached query share
  one pending result (single-flight), so a burst of identical queries costs one model input;
- the worker runs one model call at a time in a background thread, with every query queued meanwhile
  (at most ``max_batch_size``): the busier the service, the bigger the batches;
- memory is bounded in bytes (``max_bytes``, default 1 GiB), counted from the objects each entry keeps
  (:func:`entry_bytes`) plus the dictionary that holds them, so the bound holds whatever the query lengths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

THIRTY_DAYS = 30 * 24 * 3600.0
ONE_GIB = 1 << 30


def entry_bytes(query: str, vector: np.ndarray) -> int:
    """Bytes one cache entry keeps allocated, not counting its slot in the dictionary.

    The key string, the ``(expires_at, vector)`` tuple, the float in it, the array object and its data
    buffer (``vector`` must own its data: a view would keep its whole batch alive, uncounted), each as
    ``sys.getsizeof`` reports it, rounded up as CPython's allocator hands it out (:func:`_allocated`). E.g.
    80 + 64 + 32 + 112 + 1,040 = 1,328 bytes for a 23-character ASCII query and a 256-d float32 vector.
    """
    if vector.base is not None:
        raise ValueError("`vector` is a view: copy it, or the batch array it views stays alive uncounted.")
    header = sys.getsizeof(vector) - vector.nbytes
    objects = (sys.getsizeof(query), _TUPLE_BYTES, _FLOAT_BYTES, header, vector.nbytes)
    return sum(_allocated(size) for size in objects)


def _allocated(size: int) -> int:
    """Bytes an allocation of ``size`` really takes: CPython's small-object allocator serves up to 512 bytes
    in 16-byte classes; larger blocks come from malloc, which adds a 16-byte header (glibc, 64-bit)."""
    rounded = -(-size // 16) * 16
    return rounded if size <= 512 else rounded + 16


_TUPLE_BYTES = sys.getsizeof((0.0, None))
_FLOAT_BYTES = sys.getsizeof(0.0)


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`CachedQueryEmbedder` since it was created.

    Args:
        hits: Requests answered from the cache.
        misses: Requests not in the cache (``coalesced`` of them joined a pending model input).
        coalesced: Misses that waited for an identical query already queued or being embedded.
        model_calls: Calls of the model (each embeds one micro-batch).
        model_queries: Queries the model embedded (the sum of the batch sizes).
        expirations: Entries found past their TTL and dropped.
        evictions: Entries dropped to keep the cache within ``max_bytes`` / ``max_size`` (least recently used
            first).
        size: Entries in the cache now.
        bytes: Memory the cache holds now: its entries (:func:`entry_bytes`) and the dictionary's own tables.
    """

    hits: int
    misses: int
    coalesced: int
    model_calls: int
    model_queries: int
    expirations: int
    evictions: int
    size: int
    bytes: int

    @property
    def hit_rate(self) -> float:
        """``hits / (hits + misses)``, 0.0 before the first request."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "hit_rate": self.hit_rate}


class CachedQueryEmbedder:
    """Embed queries through an in-process TTL + LRU cache, with single-flight and micro-batched misses.

    ``await embedder.embed(query)`` returns the query's embedding. Within ``ttl_seconds`` of being
    computed, a query is answered from the cache; the least recently used entries go first when the
    cache would hold more than ``max_bytes`` (or more than ``max_size`` entries). Misses are embedded by
    ``encode`` in micro-batches on a single worker thread, so the event loop keeps answering hits while the
    model runs. If ``encode`` raises, every
    request of that batch gets the error and nothing is cached, so the next request retries.

    All methods must be called from one event loop (the one that serves requests); the worker task is
    started there on the first miss.

    Args:
        encode: Maps a list of queries to a ``(len(queries), dim)`` float array, e.g.
            ``functools.partial(query_tower.encode, batch_size=64)``.
        max_bytes: Most memory the cache holds (default 1 GiB): every entry as :func:`entry_bytes` counts
            it plus the dictionary's own tables. Filled with 1M queries, the process grew by 0.99-1.02x
            ``max_bytes`` (RSS). A 256-d float32 entry with a 23-character query costs 1,328 bytes (1,423 with
            its dictionary slot), so the default keeps about 750,000 such queries. ``0`` disables the cache:
            every request goes to the model (identical concurrent misses are still coalesced).
        max_size: Most entries kept, on top of ``max_bytes`` (default None: no entry bound). ``0`` also
            disables the cache.
        ttl_seconds: Seconds an embedding stays valid (default 30 days, as in the paper). Set it to
            how often the query tower is redeployed at most.
        max_batch_size: Most queries per model call (default 64).
        max_wait_ms: How long an idle worker waits for more misses before calling the model (default
            1 ms). Under load the worker is rarely idle and the queue fills while the model runs.
        clock: Seconds, monotonic; injectable so tests can move time (default ``time.monotonic``).

    Example:
        ```python
        import asyncio
        import numpy as np

        def encode(queries):  # stands in for query_tower.encode
            print("model call:", queries)
            return np.ones((len(queries), 4), dtype=np.float32) / 2

        async def main():
            embedder = CachedQueryEmbedder(encode, max_wait_ms=5)
            await asyncio.gather(embedder.embed("red dress"), embedder.embed("red dress"), embedder.embed("lamp"))
            await embedder.embed("lamp")
            print(embedder.stats())
            embedder.close()

        asyncio.run(main())
        # model call: ['red dress', 'lamp']
        # CacheStats(hits=1, misses=3, coalesced=1, model_calls=1, model_queries=2, expirations=0, evictions=0, size=2,
        #            bytes=903)
        ```
    """

    def __init__(
        self,
        encode: Callable[[list[str]], np.ndarray],
        *,
        max_bytes: int = ONE_GIB,
        max_size: int | None = None,
        ttl_seconds: float = THIRTY_DAYS,
        max_batch_size: int = 64,
        max_wait_ms: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"`max_bytes` must be an int >= 0 (0 disables the cache), got {max_bytes!r}.")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0):
            raise ValueError(f"`max_size` must be None or an int >= 0 (0 disables the cache), got {max_size!r}.")
        if not ttl_seconds > 0:
            raise ValueError(f"`ttl_seconds` must be > 0, got {ttl_seconds!r}.")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be an int >= 1, got {max_batch_size!r}.")
        if not max_wait_ms >= 0:
            raise ValueError(f"`max_wait_ms` must be >= 0, got {max_wait_ms!r}.")
        self.encode = encode
        self.max_bytes = max_bytes
        self.max_size = max_size
        self.enabled = max_bytes > 0 and max_size != 0
        self.ttl_seconds = float(ttl_seconds)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, np.ndarray]] = OrderedDict()  # query -> (expires_at, vector)
        self._entry_bytes = 0  # sum of entry_bytes over self._entries
        self._pending: dict[str, asyncio.Future] = {}  # queued or being embedded
        self._queue: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-model")
        self._counts = dict.fromkeys(
            ("hits", "misses", "coalesced", "model_calls", "model_queries", "expirations", "evictions"), 0
        )

    def lookup(self, query: str) -> np.ndarray | None:
        """The cached embedding of ``query`` (counted as a hit), or None (not counted) if absent or expired."""
        entry = self._entries.get(query)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._drop(query)
            self._counts["expirations"] += 1
            return None
        self._entries.move_to_end(query)
        self._counts["hits"] += 1
        return entry[1]

    async def embed(self, query: str) -> np.ndarray:
        """The ``(dim,)`` float32 embedding of ``query`` (read-only: copy it before changing it).

        Raises:
            TypeError: ``query`` is not a str.
            Exception: Whatever ``encode`` raised for the batch this query was in.
        """
        if not isinstance(query, str):
            raise TypeError(f"`query` must be a str, got {type(query).__name__}: {query!r}.")
        vector = self.lookup(query)
        if vector is not None:
            return vector
        self._counts["misses"] += 1
        future = self._pending.get(query)
        if future is not None:
            self._counts["coalesced"] += 1
        else:
            future = asyncio.get_running_loop().create_future()
            self._pending[query] = future
            self._queue.append(query)
            self._start_worker()
            self._wakeup.set()
        # Shielded: a request cancelled (client gone) must not cancel the result others are waiting for.
        return await asyncio.shield(future)

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        return CacheStats(**self._counts, size=len(self._entries), bytes=self.memory_bytes())

    def memory_bytes(self) -> int:
        """Bytes the cache holds now: its entries (:func:`entry_bytes`) plus the dictionary's tables and nodes."""
        return self._entry_bytes + sys.getsizeof(self._entries)

    def clear(self) -> None:
        """Drop every cached entry (counters are kept)."""
        self._entries = OrderedDict()  # a new dict: clear() would keep the old one's tables allocated
        self._entry_bytes = 0

    def close(self) -> None:
        """Stop the worker task and its thread; pending requests get ``asyncio.CancelledError``."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="query-embedder")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if len(self._queue) < self.max_batch_size and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)  # the model is idle: give a burst time to arrive
            batch = self._queue[: self.max_batch_size]
            del self._queue[: self.max_batch_size]
            if not self._queue:
                self._wakeup.clear()
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode_batch, batch)
            except Exception as error:  # handed to every waiter; the worker keeps serving
                logger.exception("Query embedding failed for a batch of %d queries.", len(batch))
                for query in batch:
                    self._pending.pop(query).set_exception(error)
                continue
            self._store(batch, vectors)

    def _encode_batch(self, batch: list[str]) -> np.ndarray:
        vectors = np.asarray(self.encode(batch), dtype=np.float32)  # (len(batch), dim)
        if vectors.ndim != 2 or len(vectors) != len(batch):
            raise ValueError(
                f"`encode` must return a (len(queries), dim) array; got shape {vectors.shape} for {len(batch)} queries."
            )
        return vectors

    def _store(self, batch: Sequence[str], vectors: np.ndarray) -> None:
        self._counts["model_calls"] += 1
        self._counts["model_queries"] += len(batch)
        expires_at = self.clock() + self.ttl_seconds
        for query, row in zip(batch, vectors, strict=True):
            vector = row.copy()  # its own data: a row view would keep the whole batch array alive
            vector.setflags(write=False)
            if self.enabled:
                self._entries[query] = (expires_at, vector)
                self._entry_bytes += entry_bytes(query, vector)
            self._pending.pop(query).set_result(vector)
        while self._entries and (
            self.memory_bytes() > self.max_bytes or (self.max_size is not None and len(self._entries) > self.max_size)
        ):
            self._drop(next(iter(self._entries)))
            self._counts["evictions"] += 1

    def _drop(self, query: str) -> None:
        _, vector = self._entries.pop(query)
        self._entry_bytes -= entry_bytes(query, vector)


__all__ = ["ONE_GIB", "THIRTY_DAYS", "CacheStats", "CachedQueryEmbedder", "entry_bytes"]
