"""Random streams and the vectorised draws the synthetic world is built from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .config import STREAMS, SyntheticWorldConfig


def random_stream(config: SyntheticWorldConfig, stream: str, block: int = 0) -> np.random.Generator:
    """The random generator of one named stream (and block) of the world: each part owns one."""
    return np.random.default_rng([config.seed, STREAMS[stream], block])


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` of shape (n, dim), scaled in place to unit rows."""
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def draw_by_weight(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn with replacement, each with probability proportional to its weight."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    drawn = np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right")
    return np.minimum(drawn, len(cumulative) - 1)


def zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``rank ** -exponent`` over a random ranking of ``n`` items, summing to 1."""
    weights = (rng.permutation(n) + 1.0) ** -exponent
    return weights / weights.sum()


def offsets(lengths: np.ndarray) -> pa.Array:
    """Arrow list offsets (int32) of consecutive runs of ``lengths``."""
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def first_unique_rows(matrix: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct row of ``matrix``, in order."""
    return np.sort(np.unique(matrix, axis=0, return_index=True)[1])


class GroupSampler:
    """Draws members of many groups at once, each with probability proportional to its weight.

    Args:
        groups: Group of every member, in ``[0, num_groups)``.
        weights: Positive weight of every member.
        num_groups: Number of groups.
        members: What ``sample`` returns for each member (default: its index).
    """

    def __init__(self, groups: np.ndarray, weights: np.ndarray, num_groups: int, members: np.ndarray | None = None):
        order = np.argsort(groups, kind="stable")
        self.members = order if members is None else np.asarray(members)[order]
        self.cumulative = np.cumsum(weights[order], dtype=np.float64)
        bounds = np.searchsorted(groups[order], np.arange(num_groups + 1))  # group g: [bounds[g], bounds[g+1])
        self.start, self.stop = bounds[:-1], bounds[1:]

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One member of each requested group; -1 where the group is empty."""
        if len(self.members) == 0:
            return np.full(len(groups), -1, dtype=np.int64)
        start, stop = self.start[groups], self.stop[groups]
        below = np.where(start > 0, self.cumulative[np.maximum(start - 1, 0)], 0.0)
        total = self.cumulative[np.clip(stop - 1, 0, None)] - below
        position = np.searchsorted(self.cumulative, below + rng.random(len(groups)) * total, side="right")
        position = np.minimum(np.clip(position, start, stop - 1), len(self.members) - 1)
        return np.where(stop > start, self.members[position], -1)


__all__ = [
    "GroupSampler",
    "draw_by_weight",
    "first_unique_rows",
    "offsets",
    "random_stream",
    "unit",
    "zipf_weights",
]
