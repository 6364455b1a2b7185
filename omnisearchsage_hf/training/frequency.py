"""Streaming frequency estimates for logQ correction: count-min sketches over entity and query ids.

Sampled softmax over in-batch negatives over-penalises popular entities: they show up as negatives in
proportion to how often they are engaged. Yi et al. (2019) correct each negative's logit by
``-log Q(n)``, the log probability that ``n`` is sampled into a batch, and estimate Q from the stream of
ids seen in training. We count ids with count-min sketches (Cormode & Muthukrishnan, 2005): a fixed
``depth x width`` table of counters, so memory stays ``8 * depth * width`` bytes however many distinct
ids the catalogue has, at the price of a bounded, one-sided overcount.

Multi-process training: every process must hold identical sketches, so update them with ids gathered
from all processes (:func:`~omnisearchsage_hf.training.distributed.all_gather_no_grad`) and seed their
hash functions identically (the default). They are training state, not model weights: checkpoints
save them as safetensors through their ``state_dict``/``load_state_dict`` (plain tensors only; see
:mod:`~omnisearchsage_hf.training.checkpoints`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# Hashing works modulo the Mersenne prime 2**31 - 1. An int64 id is cut into three chunks of 22, 21 and
# 21 bits (each < p), so every product a * chunk < 2**53 and a sum over two ids' six chunks < 2**56:
# no int64 overflow on any device.
_PRIME = 2**31 - 1
_CHUNK_BITS = (22, 21, 21)
_MASK64 = 2**64 - 1


def _splitmix64(seed: int, count: int) -> list[int]:
    """``count`` pseudo-random 64-bit ints from ``seed`` (SplitMix64): stable across machines and versions."""
    state, out = seed & _MASK64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


def _chunks(keys: torch.Tensor) -> torch.Tensor:
    """Split ``(n, key_size)`` int64 keys (any sign) into ``(n, 3 * key_size)`` non-negative chunks < 2**22."""
    parts, shift = [], 0
    for bits in _CHUNK_BITS:
        parts.append((keys >> shift) & ((1 << bits) - 1))  # (n, key_size)
        shift += bits
    return torch.cat(parts, dim=1)  # (n, 3 * key_size)


class CountMinSketch:
    """Approximate counts of int64 keys in a fixed ``(depth, width)`` table.

    Each of the ``depth`` rows hashes a key to one of ``width`` counters with its own universal hash
    ``h_i(x) = ((sum_k a_ik * x_k + b_i) mod p) mod width``, where ``x_k`` are 21-22-bit chunks of the
    key and ``p = 2**31 - 1``. ``update`` adds one to the key's counter in every row; ``query`` returns the
    minimum over rows. The hash parameters come from ``seed`` through SplitMix64 (never Python's salted
    ``hash()``), so every process and every resumed run hashes identically.

    Error bound, after ``N = total`` updates: the estimate is never below the true count, and with
    probability at least ``1 - e**-depth`` it is at most ``true + (e / width) * N``.

    Args:
        width: Counters per row, ``1 <= width < 2**31``; the error term scales as ``1 / width``.
            Default ``2**20``.
        depth: Rows, >= 1; the failure probability is ``e**-depth``. Default 2.
        seed: Seed of the hash parameters. Sketches that are compared or merged must share it.
        key_size: Ints per key: 1 for ids of shape ``(n,)``, 2 for pairs of shape ``(n, 2)``, ...

    Attributes:
        table: ``(depth, width)`` int64 counters. It lives on the device of the last keys it saw.
        total: 0-d int64 tensor, the number of keys added (``N``).

    Example:
        ::

            sketch = CountMinSketch(width=1024, depth=2)
            sketch.update(torch.tensor([7, 7, 123456789012]))
            sketch.query(torch.tensor([7, 8]))
            # tensor([2, 0])
    """

    def __init__(self, width: int = 2**20, depth: int = 2, *, seed: int = 0, key_size: int = 1):
        if not isinstance(width, int) or not 1 <= width < _PRIME:
            raise ValueError(f"`width` must be an int in [1, {_PRIME}), got {width!r}.")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"`depth` must be a positive int, got {depth!r}.")
        if not isinstance(key_size, int) or key_size < 1:
            raise ValueError(f"`key_size` must be a positive int, got {key_size!r}.")
        self.width, self.depth, self.seed, self.key_size = width, depth, seed, key_size
        num_coefficients = len(_CHUNK_BITS) * key_size
        draws = _splitmix64(seed, depth * (num_coefficients + 1))
        a = [1 + draw % (_PRIME - 1) for draw in draws[: depth * num_coefficients]]  # a in [1, p)
        b = [draw % _PRIME for draw in draws[depth * num_coefficients :]]  # b in [0, p)
        self.hash_a = torch.tensor(a, dtype=torch.long).view(depth, num_coefficients)
        self.hash_b = torch.tensor(b, dtype=torch.long)  # (depth,)
        self.table = torch.zeros(depth, width, dtype=torch.long)
        self.total = torch.zeros((), dtype=torch.long)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the counters: ``8 * depth * width``."""
        return self.table.numel() * self.table.element_size()

    def to(self, device: torch.device | str) -> CountMinSketch:
        """Move the table and hash parameters to ``device`` (in place); returns ``self``."""
        self.table, self.total = self.table.to(device), self.total.to(device)
        self.hash_a, self.hash_b = self.hash_a.to(device), self.hash_b.to(device)
        return self

    def buckets(self, keys: torch.Tensor) -> torch.Tensor:
        """Counter index of each key in each row: ``(depth, n)`` int64 in ``[0, width)``."""
        return self._hash(self._check_keys(keys))

    def _hash(self, keys: torch.Tensor) -> torch.Tensor:
        chunks = _chunks(keys)  # (n, 3 * key_size)
        # Integer matmul is missing on CUDA, so multiply and sum by broadcasting.
        mixed = (chunks[None, :, :] * self.hash_a[:, None, :]).sum(dim=-1)  # (depth, n)
        return (mixed + self.hash_b[:, None]) % _PRIME % self.width  # (depth, n)

    @torch.no_grad()
    def update(self, keys: torch.Tensor) -> None:
        """Count each key once (repeated keys count repeatedly)."""
        keys = self._check_keys(keys)
        buckets = self._hash(keys)  # (depth, n)
        rows = torch.arange(self.depth, device=keys.device)[:, None] * self.width  # (depth, 1)
        flat = (rows + buckets).reshape(-1)  # (depth * n,)
        self.table.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.total += keys.shape[0]

    @torch.no_grad()
    def query(self, keys: torch.Tensor) -> torch.Tensor:
        """Estimated count of each key: ``(n,)`` int64, never below the true count."""
        keys = self._check_keys(keys)
        buckets = self._hash(keys)  # (depth, n)
        return self.table.gather(1, buckets).amin(dim=0)  # (n,)

    def reset(self) -> None:
        """Zero all counters and the total."""
        self.table.zero_()
        self.total.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counters, total and hash parameters, as plain int64 tensors (safetensors can hold them)."""
        return {"table": self.table, "total": self.total, "hash_a": self.hash_a, "hash_b": self.hash_b}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`, copying onto this sketch's current device.

        The saved hash parameters are adopted with the counters (a table is only meaningful with the
        hashes that filled it).

        Raises:
            ValueError: Keys are missing or unexpected, or the saved table's shape is not ``(depth, width)``.
        """
        _check_keys_match(state_dict, {"table", "total", "hash_a", "hash_b"}, type(self).__name__)
        if tuple(state_dict["table"].shape) != (self.depth, self.width):
            raise ValueError(
                f"Saved sketch table has shape {tuple(state_dict['table'].shape)} but this sketch has "
                f"(depth, width) = ({self.depth}, {self.width}); build it with the saved width and depth."
            )
        if tuple(state_dict["hash_a"].shape) != tuple(self.hash_a.shape):
            raise ValueError(
                f"Saved `hash_a` has shape {tuple(state_dict['hash_a'].shape)}, expected {tuple(self.hash_a.shape)}: "
                f"the sketch was saved with another `key_size` than {self.key_size}."
            )
        device = self.table.device
        self.table = state_dict["table"].to(device=device, dtype=torch.long).clone()
        self.total = state_dict["total"].to(device=device, dtype=torch.long).clone()
        self.hash_a = state_dict["hash_a"].to(device=device, dtype=torch.long).clone()
        self.hash_b = state_dict["hash_b"].to(device=device, dtype=torch.long).clone()

    def _check_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Validate ``(n,)`` or ``(n, key_size)`` integer keys; return them ``(n, key_size)`` int64 on its device.

        The table follows the keys: on first use from another device it moves there.
        """
        if not isinstance(keys, torch.Tensor) or keys.dtype.is_floating_point or keys.dtype.is_complex:
            raise ValueError(f"`keys` must be an integer tensor, got {getattr(keys, 'dtype', type(keys))}.")
        if keys.dtype == torch.bool:
            raise ValueError("`keys` must be an integer tensor, got torch.bool.")
        expected = "(n,)" if self.key_size == 1 else f"(n, {self.key_size})"
        if self.key_size == 1 and keys.ndim == 1:
            keys = keys[:, None]  # (n, 1)
        if keys.ndim != 2 or keys.shape[1] != self.key_size:
            raise ValueError(f"`keys` must have shape {expected}, got {tuple(keys.shape)}.")
        if keys.device != self.table.device:
            self.to(keys.device)
        return keys.long()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(width={self.width}, depth={self.depth}, seed={self.seed}, key_size={self.key_size})"
        )


class FrequencyEstimator:
    """Log sampling probability ``log Q(n)`` of ids drawn into a batch, from a count-min sketch.

    After ``update`` has seen ``total`` ids, an id counted ``count(n)`` times is drawn with probability
    about ``count(n) / total`` per slot, so among ``num_draws`` slots it appears with probability about
    ``num_draws * count(n) / total``:

        ``log Q(n) = log count(n) - log total + log num_draws``

    This is the quantity subtracted from a negative's logit (Yi et al., 2019). It is an expected count
    rather than a clipped probability (it can exceed 0 for very popular ids); unseen ids count as 1.

    With ``catalogue_size`` C known, every id also starts with ``prior_count`` pseudo-draws (additive
    smoothing): ``log Q(n) = log(count(n) + a) - log(total + a * C) + log num_draws``. Before any update
    that is the uniform ``num_draws / C``, so the correction starts at the scale it converges to instead
    of at 0; without a prior the first steps see ``Q ≈ 1`` for everything and the corrected loss climbs
    for hundreds of steps while the sketch fills, which hides the model's progress.

    Args:
        width: Counters per sketch row (memory: ``8 * depth * width`` bytes; 16 MiB at the defaults).
        depth: Sketch rows.
        seed: Hash seed; must be equal on every process.
        catalogue_size: Number of distinct ids that can be drawn (the candidate table's size), or None.
        prior_count: Pseudo-draws per id when ``catalogue_size`` is given (> 0).

    Example:
        ::

            estimator = FrequencyEstimator(width=1024)
            estimator.update(torch.tensor([1, 1, 2, 3]))
            estimator.log_prob(torch.tensor([1, 2]), num_draws=4).exp()
            # tensor([2., 1.])   (4 draws * count / total of 4)
    """

    def __init__(
        self,
        width: int = 2**20,
        depth: int = 2,
        *,
        seed: int = 0,
        catalogue_size: int | None = None,
        prior_count: float = 1.0,
    ):
        if catalogue_size is not None and (not isinstance(catalogue_size, int) or catalogue_size < 1):
            raise ValueError(f"`catalogue_size` must be a positive int or None, got {catalogue_size!r}.")
        if not prior_count > 0:
            raise ValueError(f"`prior_count` must be > 0, got {prior_count!r}.")
        self.sketch = CountMinSketch(width, depth, seed=seed)
        self.catalogue_size, self.prior_count = catalogue_size, float(prior_count)

    def update(self, ids: torch.Tensor) -> None:
        """Count ``(n,)`` ids; pass the ids gathered from all processes so every copy stays identical."""
        self.sketch.update(ids)

    def log_prob(self, ids: torch.Tensor, *, num_draws: int | None = None) -> torch.Tensor:
        """``(n,)`` float32 ``log Q`` of each id for a batch of ``num_draws`` slots (default ``len(ids)``)."""
        num_draws = ids.shape[0] if num_draws is None else num_draws
        if num_draws < 1:
            raise ValueError(f"`num_draws` must be >= 1, got {num_draws!r}.")
        counts = self.sketch.query(ids).double()  # (n,)
        total = self.sketch.total.double()
        if self.catalogue_size is None:
            counts, total = counts.clamp(min=1), total.clamp(min=1)
        else:
            counts, total = counts + self.prior_count, total + self.prior_count * self.catalogue_size
        return (counts.log() - total.log() + math.log(num_draws)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sketch.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.sketch.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sketch!r})"


class ConditionalFrequencyEstimator:
    """Log conditional probability ``log P(p | q)`` of a positive given its query, from two sketches.

    One sketch counts ``(query, positive)`` pairs, the other counts queries:
    ``log P(p | q) = log C(q, p) - log C(q)``. Sketch overcounts can push the ratio above 1; it is clipped
    to ``log P <= 0``. Used to correct the positive's logit (the reference's "positive correction").

    Args:
        width, depth, seed: As in :class:`FrequencyEstimator`, for each of the two sketches (memory:
            ``2 * 8 * depth * width`` bytes).

    Example:
        ::

            estimator = ConditionalFrequencyEstimator(width=1024)
            estimator.update(torch.tensor([5, 5, 5, 6]), torch.tensor([1, 1, 2, 1]))
            estimator.log_prob(torch.tensor([5, 6]), torch.tensor([1, 1])).exp()
            # tensor([0.6667, 1.0000])
    """

    def __init__(self, width: int = 2**20, depth: int = 2, *, seed: int = 0):
        self.pairs = CountMinSketch(width, depth, seed=seed, key_size=2)
        self.queries = CountMinSketch(width, depth, seed=seed)

    def update(self, query_ids: torch.Tensor, candidate_ids: torch.Tensor) -> None:
        """Count ``(n,)`` query ids and their ``(n,)`` positives (gathered from all processes)."""
        self.pairs.update(_pair_keys(query_ids, candidate_ids))
        self.queries.update(query_ids)

    def log_prob(self, query_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """``(n,)`` float32 ``log P(candidate | query)``, at most 0; unseen pairs and queries count as 1."""
        pair_counts = self.pairs.query(_pair_keys(query_ids, candidate_ids)).clamp(min=1).double()  # (n,)
        query_counts = self.queries.query(query_ids).clamp(min=1).double()  # (n,)
        return (pair_counts.log() - query_counts.log()).clamp(max=0.0).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _prefixed({"pairs": self.pairs, "queries": self.queries})

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        _load_prefixed({"pairs": self.pairs, "queries": self.queries}, state_dict, type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pairs={self.pairs!r}, queries={self.queries!r})"


class EstimatorGroup(dict):
    """Named estimators checkpointed as one object: ``{name: estimator}`` with a prefixed ``state_dict``.

    A checkpoint saves and resumes every sketch in it through this one object (keys like
    ``"in_batch.table"``, ``"positive.pairs.table"``).
    """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _prefixed(self)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        _load_prefixed(self, state_dict, type(self).__name__)


def _pair_keys(query_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    if query_ids.shape != candidate_ids.shape or query_ids.ndim != 1:
        raise ValueError(
            f"`query_ids` and `candidate_ids` must both have shape (n,), got {tuple(query_ids.shape)} "
            f"and {tuple(candidate_ids.shape)}."
        )
    return torch.stack([query_ids, candidate_ids], dim=1)  # (n, 2)


def _prefixed(parts: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, part in parts.items() for key, value in part.state_dict().items()}


def _load_prefixed(parts: Mapping[str, object], state_dict: Mapping[str, torch.Tensor], owner: str) -> None:
    expected = set(_prefixed(parts))
    _check_keys_match(state_dict, expected, owner)
    for name, part in parts.items():
        part.load_state_dict({key[len(name) + 1 :]: v for key, v in state_dict.items() if key.startswith(name + ".")})


def _check_keys_match(state_dict: Mapping[str, torch.Tensor], expected: set[str], owner: str) -> None:
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Cannot load {owner} state: missing keys {missing}, unexpected keys {unexpected}. Was it saved "
            "with other loss options (in-batch / random negatives, logQ or positive correction)?"
        )


__all__ = ["ConditionalFrequencyEstimator", "CountMinSketch", "EstimatorGroup", "FrequencyEstimator"]
