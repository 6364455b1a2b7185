"""HNSW retrieval over entity embeddings: one faiss index per entity type, string ids, exact recall check.

Paper §3.6 retrieves entities with HNSW. We use faiss's ``IndexHNSWFlat`` (inner product over unit
vectors = cosine). ``bench/ann_index.py`` compared it with hnswlib and usearch with the same graph
settings on the same generated data (``bench/results/ann_index.md``): faiss and hnswlib were close in
build time, recall and speed, usearch slower to build and to search at about the same recall; faiss is the
most actively maintained and also offers quantised and IVF indexes should flat vectors outgrow memory.

Each entity type (``pin``, ``product``, …) gets its own graph, so "search only products" is a search
of the product graph: no post-filtering, and ``k`` results per type are always ``k`` of that type.
A saved index is a folder: ``index.json`` (types, sizes, HNSW settings, measured recall, and the SHA-256
of every other file; written last) plus, per type, ``<type>.faiss`` (faiss's own binary format) and
``<type>.ids.json``. :meth:`EntityIndex.load` reads only files of that folder (no path separators, no
``..``, no symlink leading out) and checks each against its recorded hash before parsing it, so flipped
vector bytes or a permuted id list are an error naming the file, never wrong answers. Hashing streams the
files, so a load costs about twice ``faiss.read_index`` alone (figures in :meth:`EntityIndex.load`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..atomic import replace_atomically, write_text_atomically
from ..data.tables import file_sha256
from .folders import check_file_sha256, read_json, read_manifest

MANIFEST = "index.json"
# Vectors handed to faiss per `add` call: each call is a step of the progress bar (a 1M-entity graph
# takes minutes to build).
ADD_CHUNK_SIZE = 50_000
_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")  # entity types become file names
_SHOWN_IDS = 5  # ids an error message lists
_REBUILD = "Rebuild the index with `omnisearchsage-index` (into a new --out folder)."


@dataclass
class SearchResult:
    """Top-k of one entity type for a batch of queries.

    Args:
        ids: ``ids[i]`` lists the ids of query ``i``'s neighbours, best first (fewer than ``k`` only
            when the type has fewer than ``k`` entities).
        scores: ``(num_queries, k)`` float32 inner products, best first (``-inf`` where no neighbour).
    """

    ids: list[list[str]]
    scores: np.ndarray


def exact_search(queries: np.ndarray, embeddings: np.ndarray, k: int, *, chunk_size: int = 65_536) -> np.ndarray:
    """Row indices of the exact top-``k`` inner products, best first, in memory bounded by the chunk.

    Args:
        queries: ``(num_queries, dim)`` float32.
        embeddings: ``(n, dim)`` float32.
        k: Neighbours per query, ``1 <= k <= n``.
        chunk_size: Embedding rows scored per matmul; memory is ``num_queries x (chunk_size + k)`` floats.

    Returns:
        ``(num_queries, k)`` int64 row indices; ties go to the lower row index.
    """
    if not 1 <= k <= len(embeddings):
        raise ValueError(f"`k` must be in [1, {len(embeddings)}] (the number of embeddings), got {k!r}.")
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), chunk_size):
        scores = queries @ embeddings[start : start + chunk_size].T  # (num_queries, chunk)
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)  # (num_queries, kept + chunk)
        rows = np.concatenate([best_rows, rows], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]  # (num_queries, keep), unordered
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_rows = np.take_along_axis(rows, top, axis=1)
    order = np.lexsort((best_rows, -best_scores), axis=1)  # score desc, then row asc
    return np.take_along_axis(best_rows, order, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ exact| / k`` for ``(num_queries, k)`` row indices."""
    hits = sum(len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact, strict=True))
    return hits / exact.size


class EntityIndex:
    """HNSW indices over entity embeddings, one per entity type, searched by query embedding.

    Args:
        dim: Embedding dimension (256 for the paper's towers).
        m: HNSW graph degree (default 32); more is higher recall, more memory and slower builds.
        ef_construction: Candidate list size while building (default 200).
        ef_search: Candidate list size while searching (default 64), >= ``k``; the main recall/speed knob,
            changeable after loading.

    The defaults are the setting measured at 1,000,000 generated 256-d entities in
    ``bench/results/ann_index.md``: recall@10 0.98 against exact search at ef_search 64, where the lighter
    M 16 / ef_construction 64 graph (faster to build) reached only 0.74, and 0.88 at ef_search 512
    (``bench/results/ann_index_m16.md``).

    Example:
        ```python
        import numpy as np
        rng = np.random.default_rng(0)
        pins = rng.standard_normal((1000, 8)).astype(np.float32)
        pins /= np.linalg.norm(pins, axis=1, keepdims=True)
        index = EntityIndex(dim=8)
        index.add("pin", [f"pin{i}" for i in range(1000)], pins)
        result = index.search(pins[:2], k=3)["pin"]
        print(result.ids[0][0], result.ids[1][0])
        # pin0 pin1
        print(index.recall("pin", pins[:100], k=10) >= 0.95)
        # True
        ```
    """

    def __init__(self, *, dim: int, m: int = 32, ef_construction: int = 200, ef_search: int = 64):
        for name, value in (("dim", dim), ("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.dim, self.m, self.ef_construction = dim, m, ef_construction
        self._ef_search = ef_search
        self._indexes: dict[str, faiss.IndexHNSWFlat] = {}
        self._ids: dict[str, list[str]] = {}
        self.recall_at_10: dict[str, float] = {}  # measured by `build_entity_index`, saved in the manifest

    @property
    def entity_types(self) -> list[str]:
        return sorted(self._indexes)

    def sizes(self) -> dict[str, int]:
        """Entities per type."""
        return {entity_type: len(ids) for entity_type, ids in sorted(self._ids.items())}

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`ef_search` must be a positive int, got {value!r}.")
        self._ef_search = value
        for index in self._indexes.values():
            index.hnsw.efSearch = value

    def add(
        self,
        entity_type: str,
        ids: Sequence[str],
        embeddings: np.ndarray,
        *,
        chunk_size: int = ADD_CHUNK_SIZE,
        show_progress_bar: bool = False,
    ) -> None:
        """Add entities of one type (creating its graph on first use).

        The vectors go into the graph ``chunk_size`` at a time, in table order, so a progress bar can
        follow a build that takes minutes. Within one faiss ``add`` call faiss inserts the higher HNSW
        levels first and shuffles each level, so a type larger than one chunk gets another graph than a
        single call would build, of the same quality (recall@10 0.908 with 50,000-vector chunks vs 0.903
        in one call, 60,000 clustered 32-d vectors, M 16).

        Args:
            entity_type: Letters, digits, ``_`` or ``-`` (it names the saved files).
            ids: One unique string id per row; unique within the type across all ``add`` calls.
            embeddings: ``(len(ids), dim)`` unit-norm float32 (rows are not renormalised).
            chunk_size: Vectors per faiss ``add`` call (default 50,000), >= 1.
            show_progress_bar: A tqdm bar over the vectors, labelled with the entity type.
        """
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
        if not isinstance(entity_type, str) or not _TYPE_PATTERN.match(entity_type):
            raise ValueError(f"`entity_type` must match {_TYPE_PATTERN.pattern} (it names files), got {entity_type!r}.")
        embeddings = self._check_shape(embeddings, "embeddings")
        ids = [str(i) for i in ids]
        if len(ids) != len(embeddings):
            raise ValueError(f"Got {len(ids)} ids for {len(embeddings)} embeddings of type {entity_type!r}.")
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))  # (num_bad,) rows with NaN or inf
        if len(bad):
            shown = [ids[i] for i in bad[:_SHOWN_IDS]]
            raise ValueError(
                f"Embeddings of entity type {entity_type!r} contain NaN or inf in {len(bad)} row(s): ids {shown}"
                f"{' and more' if len(bad) > len(shown) else ''}. Re-embed those entities (omnisearchsage-embed "
                "names the rows whose features overflow) or drop them."
            )
        known = self._ids.setdefault(entity_type, [])
        if len(set(ids)) != len(ids) or not set(known).isdisjoint(ids):
            raise ValueError(f"Ids of entity type {entity_type!r} must be unique; some repeat.")
        if entity_type not in self._indexes:
            index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self._ef_search
            self._indexes[entity_type] = index
        index = self._indexes[entity_type]
        label = f"Building HNSW index ({entity_type})"
        with tqdm(total=len(embeddings), desc=label, unit="vectors", disable=not show_progress_bar) as bar:
            for start in range(0, len(embeddings), chunk_size):
                index.add(embeddings[start : start + chunk_size])
                bar.update(min(chunk_size, len(embeddings) - start))
        known.extend(ids)

    def search(
        self, queries: np.ndarray, k: int = 10, entity_types: Iterable[str] | None = None
    ) -> dict[str, SearchResult]:
        """Approximate top-``k`` entities of each requested type for each query.

        Args:
            queries: ``(num_queries, dim)`` or ``(dim,)`` float32 query embeddings.
            k: Neighbours per query and type, >= 1.
            entity_types: Types to search (default: all).

        Returns:
            entity type -> :class:`SearchResult` (a ``(dim,)`` query is searched as one row).
        """
        types = self._check_types(entity_types)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        queries = self._check_queries(queries)
        params = faiss.SearchParametersHNSW(efSearch=max(self._ef_search, k))
        results = {}
        for entity_type in types:
            scores, rows = self._indexes[entity_type].search(queries, k, params=params)  # (num_queries, k) each
            scores[rows < 0] = -np.inf  # faiss pads missing neighbours with -FLT_MAX
            ids = self._ids[entity_type]
            results[entity_type] = SearchResult([[ids[r] for r in row if r >= 0] for row in rows], scores)
        return results

    def recall(self, entity_type: str, queries: np.ndarray, k: int = 10) -> float:
        """Recall@``k`` of the HNSW search against exact search over this type's stored vectors."""
        (entity_type,) = self._check_types([entity_type])
        index = self._indexes[entity_type]
        queries = self._check_queries(queries)
        stored = index.reconstruct_n(0, index.ntotal)  # (n, dim)
        k = min(k, index.ntotal)
        _, found = index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=max(self._ef_search, k)))
        return recall_at_k(found, exact_search(queries, stored, k))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` (created if missing); ``index.json`` goes last, so its presence
        means the folder is complete, and it records every other file's SHA-256. Returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)
        files = {}
        for entity_type, index in self._indexes.items():
            graph, ids = _file_names(entity_type)
            replace_atomically(directory / graph, lambda tmp, i=index: faiss.write_index(i, tmp))
            write_text_atomically(directory / ids, json.dumps(self._ids[entity_type], ensure_ascii=False))
            files.update({name: file_sha256(directory / name) for name in (graph, ids)})
        manifest = {
            "format": "omnisearchsage-hnsw-faiss",
            "faiss_version": faiss.__version__,
            "dim": self.dim,
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self._ef_search,
            "sizes": self.sizes(),
            "recall_at_10": self.recall_at_10,
            "files": files,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        write_text_atomically(directory / MANIFEST, text)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EntityIndex:
        """Read an index saved by :meth:`save`, checking every file before it is parsed.

        ``index.json`` must name only files of ``directory`` (``<type>.faiss`` and ``<type>.ids.json`` per
        type, none a symlink leading out), each file must hash to the SHA-256 recorded at build time, and
        graph size, id count and manifest size must agree. Measured on a shared 2-core machine with
        1,000,000 x 256 vectors, M 32 (a 1.30 GB graph file, 12.9 MB of ids): ``faiss.read_index`` alone
        1.5-1.8 s, hashing both files 1.2-2.2 s, the whole checked load 2.9-5.4 s (three runs).

        Raises:
            FileNotFoundError: ``index.json`` is absent (an unfinished build) or a file it names is missing.
            ValueError: A file is invalid JSON, lies outside the folder, differs from what the build wrote,
                or the counts disagree; the message names the file and says to rebuild.
        """
        directory = Path(directory)
        path = directory / MANIFEST
        manifest = read_manifest(
            path, "not an index folder, or its build did not finish (build it with `omnisearchsage-index`)."
        )
        try:
            index = cls(
                dim=manifest["dim"], m=manifest["m"], ef_construction=manifest["ef_construction"],
                ef_search=manifest["ef_search"],
            )  # fmt: skip
            sizes, files = dict(manifest["sizes"]), dict(manifest["files"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{str(path)!r} is not a valid index manifest ({error!r}). {_REBUILD}") from None
        unsafe = [t for t in sizes if not isinstance(t, str) or not _TYPE_PATTERN.match(t)]
        if unsafe:
            raise ValueError(
                f"{str(path)!r}: field 'sizes' has entity types {unsafe} that are not plain file names "
                f"(they must match {_TYPE_PATTERN.pattern}). {_REBUILD}"
            )
        expected = sorted(name for entity_type in sizes for name in _file_names(entity_type))
        if sorted(files) != expected:
            raise ValueError(
                f"{str(path)!r}: field 'files' must name exactly the files of this folder {expected}, got "
                f"{sorted(files)}. {_REBUILD}"
            )
        for entity_type, size in sizes.items():
            graph_path, ids_path = (_member(directory, name) for name in _file_names(entity_type))
            for member in (graph_path, ids_path):
                check_file_sha256(member, files[member.name], _REBUILD)
            try:
                graph = faiss.read_index(str(graph_path))
            except RuntimeError as error:
                raise ValueError(f"{str(graph_path)!r} is not a faiss index ({error}). {_REBUILD}") from None
            ids = read_json(ids_path, _REBUILD)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError(f"{str(ids_path)!r} must be a JSON list of string ids. {_REBUILD}")
            found = (graph.ntotal, graph.d, len(ids))  # vectors, their dim, ids
            if not isinstance(graph, faiss.IndexHNSWFlat) or found != (size, index.dim, size):
                raise ValueError(
                    f"Index folder {str(directory)!r} is inconsistent for type {entity_type!r}: index.json says "
                    f"{size} x {index.dim}, {graph_path.name} holds a {type(graph).__name__} of {graph.ntotal} x "
                    f"{graph.d}, {ids_path.name} has {len(ids)} ids. {_REBUILD}"
                )
            graph.hnsw.efSearch = index.ef_search
            index._indexes[entity_type], index._ids[entity_type] = graph, ids
        index.recall_at_10 = dict(manifest.get("recall_at_10", {}))
        return index

    def _check_types(self, entity_types: Iterable[str] | None) -> list[str]:
        if entity_types is None:
            return self.entity_types
        types = [entity_types] if isinstance(entity_types, str) else list(entity_types)
        unknown = [t for t in types if t not in self._indexes]
        if unknown or not types:
            raise KeyError(f"Unknown entity type(s) {unknown or types!r}; this index has {self.entity_types}.")
        return types

    def _check_shape(self, vectors: np.ndarray, name: str) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"`{name}` must have shape (n, {self.dim}), got {vectors.shape}.")
        return vectors

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = self._check_shape(np.atleast_2d(queries), "queries")
        if not np.isfinite(queries).all():
            raise ValueError("`queries` contains NaN or inf.")
        return queries


def _file_names(entity_type: str) -> tuple[str, str]:
    """The graph and id files of one entity type in an index folder."""
    return f"{entity_type}.faiss", f"{entity_type}.ids.json"


def _member(directory: Path, name: str) -> Path:
    """``directory / name``, refused if a symlink makes it lead out of ``directory``."""
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(
            f"{str(path)!r} leads out of the index folder (to {str(path.resolve())!r}); an index reads only its "
            f"own files. {_REBUILD}"
        )
    return path


def build_entity_index(
    embeddings: Mapping[str, tuple[Sequence[str], np.ndarray]],
    *,
    m: int = 16,
    ef_construction: int = 64,
    ef_search: int = 64,
    recall_queries: int = 1000,
    seed: int = 0,
    show_progress_bar: bool = False,
) -> EntityIndex:
    """Build an :class:`EntityIndex` and measure each type's recall@10 against exact search.

    The recall queries are ``recall_queries`` stored vectors of the type, drawn at random (a query
    finds itself, so recall@10 measures the 9 other neighbours as much as the first); the results are
    in ``index.recall_at_10`` and the saved manifest.

    Args:
        embeddings: entity type -> (ids, ``(n, dim)`` unit-norm float32 embeddings).
        m, ef_construction, ef_search: HNSW settings (see :class:`EntityIndex`).
        recall_queries: Queries per type for the recall check (0 skips it).
        seed: Seed of the query draw.
        show_progress_bar: A tqdm bar per type while its graph is built.
    """
    if not embeddings:
        raise ValueError("`embeddings` is empty: pass at least one entity type.")
    dims = {np.shape(vectors)[-1] for _, vectors in embeddings.values()}
    if len(dims) != 1:
        raise ValueError(f"All entity types must share one embedding dim, got {sorted(dims)}.")
    index = EntityIndex(dim=dims.pop(), m=m, ef_construction=ef_construction, ef_search=ef_search)
    rng = np.random.default_rng(seed)
    for entity_type, (ids, vectors) in embeddings.items():
        index.add(entity_type, ids, vectors, show_progress_bar=show_progress_bar)
        if recall_queries:
            rows = rng.choice(len(vectors), size=min(recall_queries, len(vectors)), replace=False)
            index.recall_at_10[entity_type] = round(index.recall(entity_type, np.asarray(vectors)[rows]), 4)
    return index


__all__ = ["ADD_CHUNK_SIZE", "EntityIndex", "SearchResult", "build_entity_index", "exact_search", "recall_at_k"]
