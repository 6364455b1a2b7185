"""The cached query embedder: hits, TTL expiry with an injected clock, LRU and memory bounds, single-flight,
batching, errors."""

import asyncio
import gc
import threading
import tracemalloc

import numpy as np
import pytest

from omnisearchsage_hf.serving.query_cache import ONE_GIB, THIRTY_DAYS, CachedQueryEmbedder, entry_bytes


class FakeModel:
    """An `encode` that records each call's batch; a query's vector encodes its length and call number."""

    def __init__(self, release: threading.Event | None = None):
        self.calls: list[list[str]] = []
        self.release = release

    def __call__(self, queries):
        if self.release is not None:
            self.release.wait(5)
        self.calls.append(list(queries))
        return np.array([[len(q), len(self.calls)] for q in queries], dtype=np.float32)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(coroutine):
    return asyncio.run(coroutine)


def test_hit_after_miss_and_counters():
    model = FakeModel()

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_wait_ms=0)
        first = await embedder.embed("red dress")
        second = await embedder.embed("red dress")
        embedder.close()
        return first, second, embedder.stats()

    first, second, stats = run(scenario())
    np.testing.assert_array_equal(first, [9, 1])
    assert second is first and not second.flags.writeable
    assert model.calls == [["red dress"]]
    assert (stats.hits, stats.misses, stats.model_calls, stats.model_queries, stats.size) == (1, 1, 1, 1, 1)
    assert stats.hit_rate == 0.5 and stats.to_dict()["hit_rate"] == 0.5


def test_ttl_expiry_with_injected_clock():
    model, clock = FakeModel(), Clock()

    async def scenario():
        embedder = CachedQueryEmbedder(model, ttl_seconds=60, max_wait_ms=0, clock=clock)
        await embedder.embed("lamp")
        clock.now += 59.9
        fresh = await embedder.embed("lamp")  # still valid
        clock.now += 0.2  # 60.1 s after it was computed
        refreshed = await embedder.embed("lamp")
        embedder.close()
        return fresh, refreshed, embedder.stats()

    fresh, refreshed, stats = run(scenario())
    assert fresh[1] == 1 and refreshed[1] == 2  # recomputed by a second model call
    assert (stats.hits, stats.misses, stats.expirations, stats.model_calls) == (1, 2, 1, 2)
    assert CachedQueryEmbedder(model).ttl_seconds == THIRTY_DAYS == 30 * 86400
    assert CachedQueryEmbedder(model).max_bytes == ONE_GIB == 2**30


def test_size_bound_evicts_least_recently_used():
    model = FakeModel()

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_size=2, max_wait_ms=0)
        for query in ("a", "bb", "a", "ccc"):  # "a" is used again, so "bb" is the oldest when "ccc" arrives
            await embedder.embed(query)
        assert embedder.lookup("bb") is None and embedder.lookup("a") is not None
        embedder.close()
        return embedder.stats()

    stats = run(scenario())
    assert (stats.size, stats.evictions, stats.model_queries) == (2, 1, 3)


def test_the_byte_bound_holds_for_the_memory_really_allocated():
    """tracemalloc sees every allocation the cache keeps (query strings, tuples, arrays and their data, the
    dictionary): what ``clear()`` frees after filling it past its bound is 90-100% of ``max_bytes`` (the
    dictionary is counted as ``sys.getsizeof`` reports it, a little over what it allocates). Uncounted keys
    (here ~10% of an entry), or rows kept as views of their 64-row batch, would exceed it."""
    max_bytes = 2 * 2**20

    def encode(queries):
        return np.random.default_rng(len(queries)).standard_normal((len(queries), 256), dtype=np.float32)

    async def scenario():
        embedder = CachedQueryEmbedder(encode, max_bytes=max_bytes, max_wait_ms=0)
        await embedder.embed("warm up")  # the worker task and its thread exist before the baseline
        embedder.clear()
        gc.collect()
        tracemalloc.start()
        try:
            for start in range(0, 4032, 64):  # queries of 8 to 207 characters, made here: only the cache keeps them
                await asyncio.gather(
                    *(embedder.embed(f"q{i:06d} " + "x" * (i % 200)) for i in range(start, start + 64))
                )
            gc.collect()
            full, stats = tracemalloc.get_traced_memory()[0], embedder.stats()
            embedder.clear()  # what remains is not the cache's: the worker's last batch, asyncio's bookkeeping
            gc.collect()
            held = full - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        embedder.close()
        return held, stats

    held, stats = run(scenario())
    assert stats.evictions > 0 and stats.size + stats.evictions == 4032
    assert 0.95 * max_bytes <= stats.bytes <= max_bytes
    assert 0.9 * max_bytes <= held <= max_bytes, held


def test_entry_bytes_counts_the_key_and_refuses_views():
    vector = np.zeros(256, dtype=np.float32)
    assert entry_bytes("a" * 100, vector) - entry_bytes("a", vector) == 96  # 149 vs 50 bytes, in 16-byte blocks
    assert entry_bytes("query number 00000001 x", vector) == 1328  # the figure the docstring gives
    with pytest.raises(ValueError, match="view"):
        entry_bytes("a", np.zeros((2, 256), dtype=np.float32)[0])


def test_single_flight_and_micro_batching():
    release = threading.Event()
    model = FakeModel(release)

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_batch_size=8, max_wait_ms=1)
        tasks = [asyncio.ensure_future(embedder.embed(q)) for q in ["same"] * 50 + ["other", "third"]]
        await asyncio.sleep(0.05)  # everything is queued; the model is held inside its first call
        release.set()
        results = await asyncio.gather(*tasks)
        embedder.close()
        return results, embedder.stats()

    results, stats = run(scenario())
    assert model.calls == [["same", "other", "third"]]  # one model input for 50 identical concurrent misses
    assert all(r is results[0] for r in results[:50])
    assert (stats.misses, stats.coalesced, stats.model_calls, stats.model_queries) == (52, 49, 1, 3)


def test_queue_fills_while_the_model_runs_and_respects_max_batch_size():
    release = threading.Event()
    model = FakeModel(release)

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_batch_size=4, max_wait_ms=0)
        first = asyncio.ensure_future(embedder.embed("q0"))
        await asyncio.sleep(0.02)  # q0 is inside the (held) model call
        rest = [asyncio.ensure_future(embedder.embed(f"q{i}")) for i in range(1, 10)]
        await asyncio.sleep(0.02)
        release.set()
        await asyncio.gather(first, *rest)
        embedder.close()

    run(scenario())
    assert [len(batch) for batch in model.calls] == [1, 4, 4, 1]


def test_cache_disabled_still_serves():
    model = FakeModel()

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_size=0, max_wait_ms=0)
        for _ in range(3):
            await embedder.embed("x")
        embedder.close()
        return embedder.stats()

    stats = run(scenario())
    assert (stats.hits, stats.misses, stats.model_calls, stats.size) == (0, 3, 3, 0)


def test_model_error_reaches_every_waiter_and_is_not_cached():
    attempts = []

    def flaky(queries):
        attempts.append(list(queries))
        if len(attempts) == 1:
            raise RuntimeError("model down")
        return np.ones((len(queries), 2), dtype=np.float32)

    async def scenario():
        embedder = CachedQueryEmbedder(flaky, max_wait_ms=1)
        results = await asyncio.gather(embedder.embed("a"), embedder.embed("a"), return_exceptions=True)
        retry = await embedder.embed("a")
        embedder.close()
        return results, retry

    results, retry = run(scenario())
    assert all(isinstance(r, RuntimeError) and str(r) == "model down" for r in results)
    np.testing.assert_array_equal(retry, [1, 1])
    assert attempts == [["a"], ["a"]]


def test_a_cancelled_waiter_does_not_cancel_the_others():
    release = threading.Event()
    model = FakeModel(release)

    async def scenario():
        embedder = CachedQueryEmbedder(model, max_wait_ms=0)
        gone, kept = asyncio.ensure_future(embedder.embed("q")), asyncio.ensure_future(embedder.embed("q"))
        await asyncio.sleep(0.02)
        gone.cancel()
        release.set()
        value = await kept
        embedder.close()
        return gone.cancelled(), value

    cancelled, value = run(scenario())
    assert cancelled and value[0] == 1


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [("max_size", -1, "max_size"), ("max_bytes", -1, "max_bytes"), ("max_bytes", 1.5, "max_bytes"),
     ("ttl_seconds", 0, "ttl_seconds"), ("max_batch_size", 0, "max_batch_size"), ("max_wait_ms", -1, "max_wait_ms")],
)  # fmt: skip
def test_bad_options(option, value, match):
    with pytest.raises(ValueError, match=match):
        CachedQueryEmbedder(FakeModel(), **{option: value})


def test_wrong_encode_output_is_an_error():
    async def scenario():
        embedder = CachedQueryEmbedder(lambda queries: np.zeros(3), max_wait_ms=0)
        with pytest.raises(ValueError, match=r"\(len\(queries\), dim\)"):
            await embedder.embed("x")
        with pytest.raises(TypeError, match="`query` must be a str"):
            await embedder.embed(3)
        embedder.close()

    run(scenario())
