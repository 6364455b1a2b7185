"""Batch entity inference on Ray Data: the output folder of ``omnisearchsage-embed``, embedded by an actor pool.

Paper §3.6 re-embeds billions of entities daily. On one machine, :func:`~.batch_inference.embed_entity_table`
under ``accelerate launch`` is the right tool: its processes split fixed chunks of rows between them, with no
scheduler and no object store in between. Past one machine, teams run such jobs on a cluster framework; this
module is the Ray Data path. ``ray.data.read_parquet`` reads the table in blocks across the cluster,
``Dataset.map_batches`` sends each block to one of ``num_actors`` actors that each hold a copy of the tower, and
the driver (the process that calls :func:`embed_entity_table_with_ray`) receives the embedded rows in whatever
order they finish, places each by its id into its table row, writes the same chunk files and merges them into
the same ``embeddings.npy``, ``ids.json`` and ``manifest.json`` as the single-machine engine (see
``batch_inference``'s module docstring). Ray Data's own ordering is not relied on: its parquet reader lists a
folder's files in parallel, and on a table of 20 files it returned the rows of file 9 first.

What is shared, not copied: rows become vectors through :func:`~.entity_rows.embed_rows` (inside each actor,
on its record batch), the table is checked by :func:`~.entity_rows.check_features`, and the plan, fingerprints,
chunk files and merge are ``batch_inference``'s. The plan is the same as the single-machine engine's for the
same table, chunk size, entity type and model, so either engine resumes from the chunks of the other, and a
killed Ray run keeps its finished chunks: the rerun leaves their rows out before they reach a tower.

How actors map to hardware: each actor reserves ``num_cpus_per_actor`` logical CPUs of Ray and runs torch
on ``ceil(num_cpus_per_actor)`` threads; with ``num_gpus_per_actor`` (default: 1 when the cluster has GPUs)
it also reserves that share of a GPU and runs the tower there. Reading needs CPUs of its own: a pool that
reserves every CPU would leave Ray Data waiting forever for a reader, so it is refused up front. On a
machine with C cores, ``num_actors=C`` and ``num_cpus_per_actor=0.5`` keeps every core busy with one
torch thread each and leaves Ray room to read; on a GPU cluster, one actor per GPU.

The driver reads the table's ``id`` column and hashes the table's bytes (the plan's fingerprint), as the
single-machine engine does, and the merged output is one folder on the driver's file system: the format
is that of one machine; the embedding work is what spreads.

Needs the ``ray`` extra: ``pip install "omnisearchsage-hf[ray]"``. Ray is imported only when this engine runs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from ..data.tables import ID_COLUMN, EntityTable, iter_batches, read_table, table_files, table_schema
from ..modeling import ItemSageModel, OmniSearchSageEntityModel
from .batch_inference import (
    MANIFEST,
    check_model,
    check_unchanged,
    file_versions,
    make_plan,
    merge_chunks,
    model_fingerprint,
    plan_id,
    prepare_output,
    write_process_record,
)
from .chunk_files import chunk_rows, read_chunk, write_chunk
from .entity_rows import check_features, embed_rows

if TYPE_CHECKING:
    from ray import ObjectRef

logger = logging.getLogger(__name__)

RAY_EXTRA = 'pip install "omnisearchsage-hf[ray]"'
# What Ray Data appends to a failed task's message ("\nFailed to apply UDF transform after 1/1 attempts …").
_RAY_RETRY_NOTE = re.compile(r"\nFailed to .+ after \d+/\d+ attempts", re.DOTALL)


def import_ray() -> ModuleType:
    """``ray``, with Ray Data loaded; an ``ImportError`` naming the extra to install when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401  (the part of Ray this engine uses; a bare `ray` install lacks its deps)
    except ImportError as error:
        raise ImportError(
            f"The Ray engine of batch inference needs Ray Data ({error}). Install it: {RAY_EXTRA}"
        ) from None
    return ray


def embed_entity_table_with_ray(
    model: OmniSearchSageEntityModel | ItemSageModel,
    table: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    entity_type: str,
    chunk_size: int = 50_000,
    batch_size: int = 256,
    num_actors: int = 1,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float | None = None,
    rows_per_call: int = 4096,
    show_progress_bar: bool = True,
) -> Path:
    """Embed every row of a parquet entity table into ``output_dir`` with Ray Data, resuming from its chunks.

    Connects to the running Ray cluster (``ray.init()`` first if none is connected: ``RAY_ADDRESS`` or a local
    one). The output folder has the files and manifest fields of :func:`~.batch_inference.embed_entity_table`, so
    ``omnisearchsage-index`` and :meth:`~.batch_inference.EntityEmbeddings.load` read it unchanged; the
    vectors equal the single-machine engine's to float32 rounding (the batches differ).

    Args:
        model: The entity tower or an ItemSage model (with its tokenizer). It is sent to the actors as its
            saved folder (safetensors, config, tokenizer) and each actor checks that what it loaded has the
            same fingerprint.
        table: A parquet file or a folder of parquet files (read in sorted file order, as the single-machine
            engine does) with an ``id`` column and the tower's feature columns, at a path every node of the
            cluster can read (a shared file system). Other formats are refused: convert them to parquet, or use
            the single-machine engine.
        output_dir: Output folder (created if missing); reuse it to resume.
        entity_type: The table's entity type, recorded for index building (e.g. ``pin``, ``product``).
        chunk_size: Rows per chunk file (default 50,000), as in the single-machine engine.
        batch_size: Entities per forward pass (default 256).
        num_actors: Towers in the pool (default 1): one per GPU, or about one per core on CPUs.
        num_cpus_per_actor: Ray logical CPUs each actor reserves (default 1.0); torch runs on
            ``ceil(num_cpus_per_actor)`` threads in it. The pool must leave at least one CPU for reading.
        num_gpus_per_actor: GPU share per actor; default 1 when the cluster has GPUs, else 0.
        rows_per_call: Rows per block and per actor call (default 4,096): blocks this size spread a table of few
            files over every actor.
        show_progress_bar: A progress bar over the chunks.

    Returns:
        ``output_dir``, merged.

    Raises:
        ImportError: Ray Data is not installed.
        ValueError: What :func:`~.batch_inference.embed_entity_table` refuses (the same messages), a table
            that is not parquet, or a pool the cluster cannot hold (too many CPUs or GPUs).
        RuntimeError: Ray Data returned a row twice, too few rows, or rows of finished chunks, or an actor loaded
            another model.

    Example:
        ```python
        ray.init(num_cpus=2)
        model = AutoModel.from_pretrained("runs/tiny/entity_tower")
        out = embed_entity_table_with_ray(model, "data/pins.parquet", "emb/pins", entity_type="pin",
                                          num_actors=2, num_cpus_per_actor=0.5)
        print(EntityEmbeddings.load(out).embeddings.shape)
        # (20000, 256)
        ```
    """
    ray = import_ray()
    features = check_model(model, chunk_size)
    files = _parquet_files(table)
    pool = _pool(ray, num_actors, num_cpus_per_actor, num_gpus_per_actor, rows_per_call, batch_size)
    output_dir = Path(output_dir)
    version = file_versions(table)  # before reading and hashing: a rewrite from here on is caught below
    entities = EntityTable(read_table(table, [ID_COLUMN]), name=str(table))  # ids only: checked non-null, unique
    columns = table_schema(table).names
    read = [name for name in features if name in columns]
    check_features(entities, features, columns, _all_null(table, read) if len(entities) else [], warn=True)
    plan = make_plan(model, table, rows=len(entities), chunk_size=chunk_size, entity_type=entity_type)
    check_unchanged(table, version)
    prepare_output(output_dir, plan)
    if (output_dir / MANIFEST).is_file():
        return output_dir  # finished earlier, and intact (prepare_output)

    run, num_chunks = plan_id(plan), math.ceil(len(entities) / chunk_size)
    todo = [chunk for chunk in range(num_chunks) if read_chunk(output_dir, chunk, run) is None]
    bar = tqdm(total=num_chunks, initial=num_chunks - len(todo), desc=f"Embedding {entity_type} chunks (Ray)",
               disable=not show_progress_bar)  # fmt: skip
    if todo:
        batches = _embedded(ray, model, files, read, entities, _finished_ids(entities, todo, chunk_size), plan, pool)
        _write_chunks(output_dir, run, entities, todo, chunk_size, batches, bar)
    bar.close()
    write_process_record(output_dir, 0, 1, list(range(num_chunks)), todo)
    check_unchanged(table, version)  # Ray's readers read the files while embedding: a rewrite would mix versions
    return merge_chunks(output_dir, entities.ids.to_pylist(), plan, model.config.out_dim)


class TowerActor:
    """One tower, in one Ray actor: embeds each record batch Ray Data hands it, through :func:`embed_rows`.

    Args:
        model_class: The tower's class; ``from_pretrained`` loads ``files`` with it.
        files: A reference, in Ray's object store, to the tower's saved folder as ``{relative path: bytes}``
            (safetensors weights, no pickle): put there once, it reaches each actor without being serialised
            into the map operator itself.
        fingerprint: :func:`model_fingerprint` of the driver's model; the loaded tower must match it.
        table_name: The table's name in error messages (the driver's, so both engines word them the same).
        skip: Ids whose chunks are already on disk: left out before embedding. None embeds every row.
        batch_size: Entities per forward pass.
        threads: torch threads.
    """

    def __init__(
        self,
        *,
        model_class: type[OmniSearchSageEntityModel | ItemSageModel],
        files: ObjectRef,
        fingerprint: str,
        table_name: str,
        skip: pa.Array | None,
        batch_size: int,
        threads: int,
    ):
        import ray

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as folder:
            for name, data in ray.get(files).items():
                (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(folder) / name).write_bytes(data)
            self.model = model_class.from_pretrained(folder)
        if model_fingerprint(self.model) != fingerprint:
            raise RuntimeError(
                f"A Ray actor loaded a {model_class.__name__} whose fingerprint differs from the driver's model; "
                "the saved folder does not reload to the same weights, config and tokenizer. Save the model, load "
                "it back with from_pretrained and embed with that."
            )
        self.model.to(torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu"))
        self.table_name, self.skip, self.batch_size = table_name, skip, batch_size

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        entities = EntityTable(batch, name=self.table_name)
        if self.skip is not None:
            entities = EntityTable(batch.filter(pc.invert(pc.is_in(entities.ids, value_set=self.skip))),
                                   name=self.table_name)  # fmt: skip
        vectors = (
            embed_rows(self.model, entities, range(len(entities)), self.batch_size)  # (len(entities), dim)
            if len(entities)
            else np.zeros((0, self.model.config.out_dim), dtype=np.float32)
        )
        return {"id": entities.ids.to_numpy(), "embedding": vectors.astype(np.float32, copy=False)}


def _parquet_files(table: str | os.PathLike) -> list[Path]:
    """The parquet files of ``table`` in the order the single-machine engine reads them; other formats refused."""
    path = Path(table)
    if path.is_file() and path.suffix.lower() != ".parquet":
        raise ValueError(
            f"Entity table {str(path)!r}: the Ray engine reads parquet (a file or a folder of parquet files) with "
            f"ray.data.read_parquet, not {path.suffix!r} files. Convert it to parquet (e.g. "
            "pyarrow.parquet.write_table(omnisearchsage_hf.data.tables.read_table(path), 'pins.parquet')), or "
            "embed it with the single-machine engine (`omnisearchsage-embed --engine local`), which also reads "
            "Arrow, jsonl and csv."
        )
    return table_files(path)


@dataclass(frozen=True)
class _ActorPool:
    """The actors of a run and what each reserves and runs (see :func:`embed_entity_table_with_ray`'s arguments)."""

    num_actors: int
    num_cpus: float
    num_gpus: float
    threads: int  # torch threads in each actor
    rows_per_call: int
    batch_size: int


def _pool(
    ray: ModuleType,
    num_actors: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float | None,
    rows_per_call: int,
    batch_size: int,
) -> _ActorPool:
    """The actor pool, once the cluster is known to hold it and a reader."""
    for name, value in (("num_actors", num_actors), ("rows_per_call", rows_per_call)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if not num_cpus_per_actor > 0:
        raise ValueError(f"`num_cpus_per_actor` must be > 0, got {num_cpus_per_actor!r}.")
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if num_actors * num_gpus_per_actor > gpus:
        raise ValueError(
            f"{num_actors} actors x {num_gpus_per_actor} GPU need {num_actors * num_gpus_per_actor:g} GPUs; the Ray "
            f"cluster has {gpus:g}. Lower `num_actors` (--num-actors) or `num_gpus_per_actor` (--num-gpus-per-actor)."
        )
    if num_actors * num_cpus_per_actor > cpus - 1:
        raise ValueError(
            f"{num_actors} actors x {num_cpus_per_actor:g} CPU reserve {num_actors * num_cpus_per_actor:g} of the Ray "
            f"cluster's {cpus:g} CPUs, leaving less than one to read the table (Ray Data would wait forever). Lower "
            f"`num_actors` (--num-actors) or `num_cpus_per_actor` (--num-cpus-per-actor), e.g. {num_actors} actors x "
            f"{max(cpus - 1, 0) / num_actors:g} CPU."
        )
    threads = max(1, math.ceil(num_cpus_per_actor))
    return _ActorPool(num_actors, num_cpus_per_actor, num_gpus_per_actor, threads, rows_per_call, batch_size)


def _all_null(table: str | os.PathLike, names: list[str]) -> list[str]:
    """The columns of ``names`` that are null in every row. Each column is read until its first value, so a
    usual table costs one record batch per column, not a read of the table on the driver."""
    return [
        name
        for name in names
        if all(batch.column(0).null_count == batch.num_rows for batch in iter_batches(table, [name], batch_size=65_536))
    ]


def _saved_files(model: torch.nn.Module) -> dict[str, bytes]:
    """The model's ``save_pretrained`` folder as ``{relative path: bytes}``: how it reaches actors on other nodes."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return {
            path.relative_to(folder).as_posix(): path.read_bytes() for path in Path(folder).rglob("*") if path.is_file()
        }


def _finished_ids(entities: EntityTable, todo: list[int], chunk_size: int) -> pa.Array | None:
    """The ids of the rows whose chunks are already on disk (not in ``todo``); None when there are none."""
    finished = np.ones(len(entities), dtype=bool)
    for chunk in todo:
        rows = chunk_rows(len(entities), chunk_size, chunk)
        finished[rows.start : rows.stop] = False
    return entities.ids.take(pa.array(np.flatnonzero(finished))).combine_chunks() if finished.any() else None


def _embedded(
    ray: ModuleType,
    model: torch.nn.Module,
    files: list[Path],
    features: list[str],
    entities: EntityTable,
    skip: pa.Array | None,
    plan: dict,
    pool: _ActorPool,
) -> Iterator[dict[str, np.ndarray]]:
    """The embedded rows of ``files`` (batches of ``id`` and ``(n, dim)`` ``embedding``) in any order, less the
    ids in ``skip``; an actor's refusal is re-raised as the error the single-machine engine raises."""
    dataset = ray.data.read_parquet([str(file) for file in files]).select_columns([ID_COLUMN, *features])
    dataset = dataset.repartition(target_num_rows_per_block=pool.rows_per_call).map_batches(
        TowerActor,
        fn_constructor_kwargs={
            "model_class": type(model),
            "files": ray.put(_saved_files(model)),
            "fingerprint": plan["model"],
            "table_name": entities.name,
            "skip": skip,
            "batch_size": pool.batch_size,
            "threads": pool.threads,
        },
        batch_size=pool.rows_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    dataset.context.raise_original_map_exception = True  # a refused row is embed_rows' ValueError, not a wrapper
    dataset.context.enable_progress_bars = False  # the driver's bar counts chunks, as the other engine's does
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (ValueError, RuntimeError)):  # embed_rows' refusal, or TowerActor's
            raise type(error.cause)(_RAY_RETRY_NOTE.split(str(error.cause), maxsplit=1)[0]) from None
        raise


def _write_chunks(
    output_dir: Path,
    run: str,
    entities: EntityTable,
    todo: list[int],
    chunk_size: int,
    batches: Iterator[dict[str, np.ndarray]],
    bar: tqdm,
) -> None:
    """Place the embedded rows into the chunks ``todo`` by their ids, and write each chunk once all its rows are in.

    Rows may arrive in any order (Ray Data lists a folder's files in parallel, so blocks need not come in file
    order): each row's table position comes from its id, so a vector can only land in its own row. A chunk
    is held in memory from its first row to its last; a row of a finished chunk, a row seen twice or a
    missing row is an error, and nothing of an incomplete chunk is written.
    """
    pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> ((rows, dim) vectors, (rows,) filled)
    left = set(todo)
    for batch in batches:
        if not len(batch["id"]):  # a block whose rows were all in finished chunks
            continue
        positions = entities.rows_of(batch["id"], where="the rows Ray Data returned")  # (n,)
        chunk_of_row = positions // chunk_size  # (n,)
        for chunk in np.unique(chunk_of_row).tolist():
            if chunk not in left:
                raise RuntimeError(
                    f"Ray Data returned a row of chunk {chunk} (id {batch['id'][chunk_of_row == chunk][0]!r}), "
                    f"which is not among the chunks left to embed ({sorted(left)}). Run again: finished chunks "
                    "are kept."
                )
            rows = chunk_rows(len(entities), chunk_size, chunk)
            if chunk not in pending:
                pending[chunk] = (
                    np.empty((len(rows), batch["embedding"].shape[1]), np.float32),
                    np.zeros(len(rows), bool),
                )
            vectors, filled = pending[chunk]
            mine = chunk_of_row == chunk
            offsets = positions[mine] - rows.start  # (rows of this batch in this chunk,)
            before = int(filled.sum())
            filled[offsets] = True
            if int(filled.sum()) - before != len(offsets):
                raise RuntimeError(
                    f"Ray Data returned a row of chunk {chunk} twice; nothing of that chunk was written. Run again."
                )
            vectors[offsets] = batch["embedding"][mine]
            if filled.all():
                write_chunk(output_dir, chunk, run, vectors)
                del pending[chunk]
                left.discard(chunk)
                bar.update(1)
    if left:
        raise RuntimeError(
            f"Ray Data returned fewer rows than the table has left to embed (chunks {sorted(left)} incomplete). Run "
            "again: finished chunks are kept."
        )


__all__ = ["RAY_EXTRA", "TowerActor", "embed_entity_table_with_ray", "import_ray"]
