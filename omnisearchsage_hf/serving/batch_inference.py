"""Batch entity inference: an entity table in, embeddings out; chunked, resumable, split across processes.

Paper §3.6 refreshes every entity embedding daily with batch inference. This module embeds a parquet /
Arrow / jsonl / csv entity table (an ``id`` column plus the entity tower's feature columns) in fixed chunks
of rows. The table is read through ``data.tables`` (Arrow, memory-mapped where the format allows), never
through ``datasets``, so a run leaves no copy of it in a cache. Each finished chunk is written to
``chunks/<chunk>-<tag>.npy`` under a temporary name and renamed, so a chunk file exists only when it is
complete: a run that is killed and started again skips the chunks already there. Under
``accelerate launch --num_processes N`` process ``r`` embeds chunks ``r, r + N, r + 2N, …``; after all
processes finish, the main one merges the chunks into

- ``embeddings.npy``: ``(num_rows, out_dim)`` float32, in table order;
- ``ids.json``: the ``id`` column, as strings, in the same order;
- ``manifest.json``: entity type, row count, dim, table and model fingerprints and the SHA-256 of the
  two files above (checked by :meth:`EntityEmbeddings.load`); written last, so its presence means the
  output is complete;
- ``processes/<rank>.json``: per process of the latest run, the chunks it was given and the ones it
  embedded (the others were already there), to check how a launch split the work.

What decides reuse: ``plan.json`` records what the chunks are computed from: the table's path and a
SHA-256 of its bytes (:func:`~omnisearchsage_hf.data.tables.table_fingerprint`), its row count, the chunk
size, the entity type and a hash of the model's weights, config and tokenizer (:func:`model_fingerprint`).
A rerun whose table content, model or chunk size differs logs one line saying what changed and recomputes
every chunk; a different table path or entity type is refused (it is another output, in the wrong folder).
A chunk's ``tag`` hashes the plan together with the chunk's bytes, so a chunk computed under another plan,
copied in from another folder, truncated or with flipped bytes is never reused: it is recomputed. A
resumed run therefore never mixes chunks of two tables or two models.

The same folder is written by the Ray Data engine (``ray_inference``): it embeds with the same per-row code
(``entity_rows``) and keeps its chunks, plan and manifest through the public functions below, so the two
engines' folders are interchangeable, and a run of one resumes from the chunks of the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..atomic import replace_atomically, write_text_atomically
from ..data.tables import EntityTable, file_sha256, table_files, table_fingerprint, table_schema
from ..devices import has_accelerator
from ..modeling import ItemSageConfig, ItemSageModel, OmniSearchSageEntityConfig, OmniSearchSageEntityModel
from .chunk_files import CHUNKS, chunk_rows, read_chunk, write_chunk
from .entity_rows import check_features, embed_rows
from .folders import check_file_sha256, read_json, read_manifest

logger = logging.getLogger(__name__)

PLAN = "plan.json"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
IDS = "ids.json"
PROCESSES = "processes"
# Models whose config lists the table columns they read (`config.input_features()`).
ENTITY_MODEL_TYPES = (OmniSearchSageEntityConfig.model_type, ItemSageConfig.model_type)
# Plan fields that say which output a folder holds: a change means a wrong --out folder, not a stale one.
_IDENTITY = ("table", "entity_type")
# Config keys that say where a model was loaded from or how to load it, not what it computes (saving adds
# `architectures` and `auto_map`, and sets `dtype`, which the tensors' own dtypes already say).
_CONFIG_ORIGIN = ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype")
# Tokenizer settings besides its vocabulary files that change the ids of a text.
_TOKENIZER_SETTINGS = ("oov_buckets", "max_chars_per_field")
_RERUN = "Run `omnisearchsage-embed` again with this --out folder: it recomputes what is damaged."


@dataclass(frozen=True)
class EntityEmbeddings:
    """A finished batch-inference output folder, loaded and checked against its manifest.

    Args:
        entity_type: The type given at inference (``pin``, ``product``, …).
        ids: Entity ids in table order.
        embeddings: ``(len(ids), dim)`` float32, memory-mapped from ``embeddings.npy``.
    """

    entity_type: str
    ids: list[str]
    embeddings: np.ndarray

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EntityEmbeddings:
        """Read an output folder of :func:`embed_entity_table`.

        ``embeddings.npy`` and ``ids.json`` are hashed and compared with the SHA-256 the manifest recorded
        (0.7-1.4 s per GB, i.e. per million 256-d rows, here), so a truncated, edited or swapped file is an
        error naming it, never wrong vectors under the right ids.

        Raises:
            FileNotFoundError: The run has not finished (no ``manifest.json``), or a file is missing.
            ValueError: A file is invalid JSON, differs from what the run wrote, or disagrees with the manifest.
        """
        directory = Path(directory)
        manifest = read_manifest(
            directory / MANIFEST,
            "batch inference has not finished there. Run (or resume) `omnisearchsage-embed` with this --out folder.",
        )
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != {EMBEDDINGS, IDS}:
            raise ValueError(
                f"{str(directory / MANIFEST)!r}: field 'files' must hold the SHA-256 of {[EMBEDDINGS, IDS]}, "
                f"got {files!r}. {_RERUN}"
            )
        for name, sha256 in files.items():
            check_file_sha256(directory / name, sha256, _RERUN)
        ids = read_json(directory / IDS, _RERUN)
        embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
        rows, dim = manifest.get("rows"), manifest.get("dim")
        if embeddings.shape != (rows, dim) or len(ids) != rows:
            raise ValueError(
                f"{str(directory)!r} is inconsistent: manifest.json says {rows} x {dim}, "
                f"embeddings.npy is {embeddings.shape}, ids.json has {len(ids)}. {_RERUN}"
            )
        return cls(manifest["entity_type"], ids, embeddings)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 of what decides a model's embeddings: weights, config and tokenizer.

    Hashes every parameter and buffer (names, dtypes and bytes), the config (less where it was loaded from), and
    for a model with a ``tokenizer`` its saved vocabulary files and the settings that change its ids.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    config = {key: value for key, value in model.config.to_dict().items() if key not in _CONFIG_ORIGIN}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as folder:
            for path in tokenizer.save_vocabulary(folder):
                digest.update(Path(path).read_bytes())
        settings = {key: tokenizer.init_kwargs.get(key) for key in _TOKENIZER_SETTINGS}
        digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def process_state() -> PartialState:
    """The Accelerate process state for batch inference: ``cpu=True`` when torch sees no accelerator.

    Accelerate only sets up a gloo process group for ``accelerate launch --multi_gpu --num_processes N``
    on a CPU-only machine when told the run is a CPU run; without it every process believes it is alone
    and embeds every chunk.
    """
    return PartialState(cpu=not has_accelerator())


def process_chunks(num_chunks: int, process_index: int, num_processes: int) -> range:
    """Chunks that process ``process_index`` of ``num_processes`` embeds: every ``num_processes``-th one.

    Assuming 2 processes and 5 chunks: process 0 embeds chunks 0, 2, 4 and process 1 chunks 1, 3.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index!r}.")
    return range(process_index, num_chunks, num_processes)


def embed_entity_table(
    model: OmniSearchSageEntityModel | ItemSageModel,
    table: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    entity_type: str,
    chunk_size: int = 50_000,
    batch_size: int = 256,
    state: PartialState | None = None,
    show_progress_bar: bool = True,
) -> Path | None:
    """Embed every row of an entity table into ``output_dir``, resuming from the chunks already there.

    A collective under ``accelerate launch``: every process must call it with the same arguments. Each
    process embeds its share of chunks (:func:`process_chunks`) on ``state.device``, then all wait for
    each other and the main process merges. In a single plain process it does all of it. Chunks are
    reused only when the table's bytes, the model and the chunk size are those they were computed from
    (see the module docstring); otherwise everything is recomputed and a warning says why.

    Args:
        model: The entity tower or an ItemSage model (with its tokenizer), e.g. ``AutoModel.from_pretrained(folder)``.
        table: A parquet, Arrow, jsonl or csv file (or a folder of parquet files) with an ``id`` column and
            the tower's feature columns. Features the table lacks are empty for every row (a warning says
            which); a table with none of them is refused.
        output_dir: Output folder (created if missing); reuse it to resume.
        entity_type: The table's entity type, recorded for index building (e.g. ``pin``, ``product``).
        chunk_size: Rows per chunk file (default 50,000): the work lost to a kill is at most one chunk per
            process.
        batch_size: Entities per forward pass (default 256).
        state: The Accelerate process state; default :func:`process_state` (one process without a launcher).
        show_progress_bar: A progress bar over this process's chunks (main process only).

    Returns:
        ``output_dir`` on the main process once merged; None on the other processes.

    Raises:
        ValueError: ``model`` is not an entity tower or ItemSage model; the table has none of the model's
            features, or rows whose features the model rejects or that embed to NaN/inf (the message names
            their ids); ``output_dir`` holds the output of another table path or entity type; or the table
            changed while it was being embedded.
        RuntimeError: Chunks are missing at merge time (another process failed).

    Example:
        ```python
        model = AutoModel.from_pretrained("runs/tiny/entity_tower")
        out = embed_entity_table(model, "data/pins.parquet", "emb/pins", entity_type="pin")
        print(EntityEmbeddings.load(out).embeddings.shape)
        # (20000, 256)
        ```
    """
    features = check_model(model, chunk_size)
    state = state or process_state()
    output_dir = Path(output_dir)
    version = file_versions(table)  # before reading and hashing: a rewrite from here on is caught below
    entities = EntityTable.read(table, name=str(table), columns=features)
    read = entities.table.column_names
    all_null = [
        n for n in features if n in read and len(entities) and entities.table.column(n).null_count == len(entities)
    ]
    check_features(entities, features, table_schema(table).names, all_null, warn=state.is_main_process)
    plan = make_plan(model, table, rows=len(entities), chunk_size=chunk_size, entity_type=entity_type)
    check_unchanged(table, version)
    num_chunks = math.ceil(len(entities) / chunk_size)
    if state.is_main_process:
        prepare_output(output_dir, plan)
    state.wait_for_everyone()
    _check_plan(output_dir, plan)  # on every process after the barrier, so all raise together
    if (output_dir / MANIFEST).is_file():
        return output_dir if state.is_main_process else None  # finished earlier, and intact (prepare_output)

    model.to(state.device)
    run = plan_id(plan)
    mine = process_chunks(num_chunks, state.process_index, state.num_processes)
    todo = [chunk for chunk in mine if read_chunk(output_dir, chunk, run) is None]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"Embedding {entity_type} chunks",
               disable=not (show_progress_bar and state.is_main_process))  # fmt: skip
    for chunk in todo:
        rows = chunk_rows(len(entities), chunk_size, chunk)
        vectors = embed_rows(model, entities, rows, batch_size)  # (len(rows), dim)
        write_chunk(output_dir, chunk, run, np.ascontiguousarray(vectors, dtype=np.float32))
        bar.update(1)
    bar.close()
    write_process_record(output_dir, state.process_index, state.num_processes, list(mine), todo)

    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    if Path(table).suffix.lower() == ".arrow":  # memory-mapped, not read up front: overwritten in place, it mixes
        check_unchanged(table, version)
    return merge_chunks(output_dir, entities.ids.to_pylist(), plan, model.config.out_dim)


def check_model(model: torch.nn.Module, chunk_size: int) -> list[str]:
    """The table columns ``model`` reads; raises unless it embeds entity tables and ``chunk_size`` is positive."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ENTITY_MODEL_TYPES:
        raise ValueError(
            f"`model` must be an entity tower or ItemSage model (model_type one of {list(ENTITY_MODEL_TYPES)}), "
            f"got a {model_type!r} model; query towers embed queries, not entity tables."
        )
    return model.config.input_features()


def make_plan(
    model: torch.nn.Module, table: str | os.PathLike, *, rows: int, chunk_size: int, entity_type: str
) -> dict:
    """What an output folder's chunks are computed from (``plan.json``, and the manifest's first fields)."""
    return {
        "table": str(Path(table).resolve()),
        "table_sha256": table_fingerprint(table),
        "rows": rows,
        "chunk_size": chunk_size,
        "entity_type": entity_type,
        "model": model_fingerprint(model),
    }


def plan_id(plan: dict) -> str:
    """The SHA-256 of a plan, which every chunk file's tag includes (``chunk_files.chunk_tag``)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def file_versions(table: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(file, size, modification time) of every file of the table."""
    return [(str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in table_files(table)]


def check_unchanged(table: str | os.PathLike, version: list[tuple[str, int, int]]) -> None:
    """Raise if the table's files differ from ``version`` (:func:`file_versions` taken before it was read)."""
    if file_versions(table) != version:
        raise ValueError(
            f"Entity table {str(table)!r} changed while it was being embedded. Run again once it is written; "
            "chunks of the earlier version are not reused."
        )


def _write_json(path: Path, content: dict) -> None:
    write_text_atomically(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_process_record(
    output_dir: Path, process_index: int, num_processes: int, chunks: list[int], embedded: list[int]
) -> None:
    """``processes/<process_index>.json``: the chunks a process was given and those it embedded."""
    record = {"process_index": process_index, "num_processes": num_processes, "chunks": chunks, "embedded": embedded}
    (output_dir / PROCESSES).mkdir(exist_ok=True)
    _write_json(output_dir / PROCESSES / f"{process_index}.json", record)


def prepare_output(output_dir: Path, plan: dict) -> None:
    """Make ``output_dir`` hold only chunks of ``plan`` (main process, before the others look at it).

    A folder of another table path or entity type is refused; a plan that differs otherwise (table
    content, model, chunk size) clears the chunks with a one-line warning. A finished output whose files
    fail their check is merged again from its chunks.
    """
    fix = "Delete this folder (or its plan.json) and run again."
    existing = read_json(output_dir / PLAN, fix) if (output_dir / PLAN).is_file() else None
    if existing is not None and existing != plan:
        other = [key for key in _IDENTITY if existing.get(key) != plan[key]]
        if other:
            raise ValueError(
                f"{str(output_dir)!r} holds the embeddings of another {' and '.join(other)} "
                f"({', '.join(f'{key} {existing.get(key)!r}' for key in other)}; now "
                f"{', '.join(f'{key} {plan[key]!r}' for key in other)}). Use a new --out folder, or delete this one."
            )
        changed = [key for key in plan if existing.get(key) != plan[key]]
        logger.warning(
            "%r: the %s changed since its chunks were computed; recomputing every chunk.",
            str(output_dir), ", ".join(changed),
        )  # fmt: skip
    if existing != plan:
        (output_dir / MANIFEST).unlink(missing_ok=True)
        (output_dir / PLAN).unlink(missing_ok=True)
        for folder in (CHUNKS, PROCESSES):  # written under an earlier plan (or none: an interrupted clean-up)
            shutil.rmtree(output_dir / folder, ignore_errors=True)
        (output_dir / CHUNKS).mkdir(parents=True)
        _write_json(output_dir / PLAN, plan)
    elif (output_dir / MANIFEST).is_file():
        try:
            EntityEmbeddings.load(output_dir)
        except (FileNotFoundError, ValueError) as error:
            logger.warning("%s Merging its chunks again.", error)
            (output_dir / MANIFEST).unlink()


def _check_plan(output_dir: Path, plan: dict) -> None:
    existing = read_json(output_dir / PLAN, _RERUN)
    if existing != plan:
        changed = sorted(key for key in plan if existing.get(key) != plan[key])
        raise ValueError(
            f"{str(output_dir)!r}: this process sees another {changed} than the main process ({plan} vs "
            f"{existing}); was the table or model rewritten during the launch? Run again."
        )


def merge_chunks(output_dir: Path, ids: list[str], plan: dict, dim: int) -> Path:
    """Concatenate the chunks into ``embeddings.npy`` (streamed, memory is one chunk) and write the rest."""
    missing = []
    num_chunks, run = math.ceil(len(ids) / plan["chunk_size"]), plan_id(plan)

    def write_embeddings(tmp: str) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        for chunk in range(num_chunks):
            vectors = read_chunk(output_dir, chunk, run)
            if vectors is None:
                missing.append(chunk)
                continue
            rows = chunk_rows(len(ids), plan["chunk_size"], chunk)
            merged[rows.start : rows.stop] = vectors  # (len(rows), dim)
        merged.flush()
        del merged
        if missing:
            raise RuntimeError(
                f"{len(missing)} chunk(s) of {str(output_dir)!r} are missing at merge time (first: {missing[0]}); "
                "a process failed. Run the same command again to compute only those."
            )

    replace_atomically(output_dir / EMBEDDINGS, write_embeddings)
    write_text_atomically(output_dir / IDS, json.dumps(ids, ensure_ascii=False))
    files = {name: file_sha256(output_dir / name) for name in (EMBEDDINGS, IDS)}
    _write_json(output_dir / MANIFEST, {**plan, "dim": dim, "chunks": num_chunks, "files": files})
    return output_dir


__all__ = [
    "ENTITY_MODEL_TYPES",
    "MANIFEST",
    "EntityEmbeddings",
    "check_model",
    "check_unchanged",
    "embed_entity_table",
    "file_versions",
    "make_plan",
    "merge_chunks",
    "model_fingerprint",
    "plan_id",
    "prepare_output",
    "process_chunks",
    "process_state",
    "write_process_record",
]
