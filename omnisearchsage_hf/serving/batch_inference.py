"""Batch entity inference: an entity table in, embeddings out; chunked, resumable, split across processes.

Paper §3.6 refreshes every entity embedding daily with batch inference. This module embeds a parquet /
jsonl / csv entity table (an ``id`` column plus the entity tower's feature columns) in fixed chunks of
rows. Each finished chunk is written to ``chunks/<chunk>.npy`` under a temporary name and renamed, so a
chunk file exists only when it is complete: a run that is killed and started again skips the chunks
already there. Under ``accelerate launch --num_processes N`` process ``r`` embeds chunks
``r, r + N, r + 2N, …``; after all processes finish, the main one merges the chunks into

- ``embeddings.npy``: ``(num_rows, out_dim)`` float32, in table order;
- ``ids.json``: the ``id`` column, as strings, in the same order;
- ``manifest.json``: entity type, row count, dim, model and table fingerprints; written last, so its
  presence means the output is complete;
- ``processes/<rank>.json``: per process of the latest run, the chunks it was given and the ones it
  embedded (the others were already there), to check how a launch split the work.

``plan.json`` records what the chunks were computed from (table, rows, chunk size, a hash of the model
weights); a restart with a different table, chunk size or model raises instead of mixing old and new
chunks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..atomic import replace_atomically, save_npy_atomically, write_text_atomically
from ..data.tables import EntityTable
from ..devices import has_accelerator
from ..modeling import ItemSageConfig, ItemSageModel, OmniSearchSageEntityConfig, OmniSearchSageEntityModel

PLAN = "plan.json"
MANIFEST = "manifest.json"
CHUNKS = "chunks"
PROCESSES = "processes"
# Models whose config lists the table columns they read (`config.input_features()`).
ENTITY_MODEL_TYPES = (OmniSearchSageEntityConfig.model_type, ItemSageConfig.model_type)


@dataclass(frozen=True)
class EntityEmbeddings:
    """A finished batch-inference output folder, loaded.

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
        """Read an output folder of :func:`embed_entity_table`; raises if its run has not finished."""
        directory = Path(directory)
        manifest = read_manifest(
            directory / MANIFEST,
            "batch inference has not finished there. Run (or resume) `omnisearchsage-embed` with this --out folder.",
        )
        ids = json.loads((directory / "ids.json").read_text(encoding="utf-8"))
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        if embeddings.shape != (manifest["rows"], manifest["dim"]) or len(ids) != manifest["rows"]:
            raise ValueError(
                f"{str(directory)!r} is inconsistent: manifest says {manifest['rows']} x {manifest['dim']}, "
                f"embeddings.npy is {embeddings.shape}, ids.json has {len(ids)}. Run inference again."
            )
        return cls(manifest["entity_type"], ids, embeddings)


def read_manifest(path: Path, missing: str) -> dict:
    """The JSON manifest a serving folder writes last; raises ``FileNotFoundError`` (``missing`` says why) if absent."""
    if not path.is_file():
        raise FileNotFoundError(f"No {path.name} in {str(path.parent)!r}: {missing}")
    return json.loads(path.read_text(encoding="utf-8"))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A BLAKE2b hash of the model's parameter and buffer bytes (names included), to tell models apart."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def chunk_rows(num_rows: int, chunk_size: int, chunk: int) -> range:
    """The table rows of chunk number ``chunk``."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_rows))


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
    each other and the main process merges. In a single plain process it does all of it.

    Args:
        model: The entity tower or an ItemSage model (with its tokenizer), e.g. ``AutoModel.from_pretrained(folder)``.
        table: A parquet, jsonl or csv file with an ``id`` column and the tower's feature columns.
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
        ValueError: ``model`` is not an entity tower or ItemSage model, or ``output_dir`` holds chunks of a
            different table, chunk size or model.
        RuntimeError: Chunks are missing at merge time (another process failed).

    Example:
        ```python
        model = AutoModel.from_pretrained("runs/tiny/entity_tower")
        out = embed_entity_table(model, "data/pins.parquet", "emb/pins", entity_type="pin")
        print(EntityEmbeddings.load(out).embeddings.shape)
        # (20000, 256)
        ```
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ENTITY_MODEL_TYPES:
        raise ValueError(
            f"`model` must be an entity tower or ItemSage model (model_type one of {list(ENTITY_MODEL_TYPES)}), "
            f"got a {model_type!r} model; query towers embed queries, not entity tables."
        )
    state = state or process_state()
    output_dir = Path(output_dir)
    features = model.config.input_features()
    entities = EntityTable.read(table, name=str(table), columns=features)
    num_chunks = math.ceil(len(entities) / chunk_size)
    plan = {
        "table": str(Path(table).resolve()),
        "rows": len(entities),
        "chunk_size": chunk_size,
        "entity_type": entity_type,
        "model": model_fingerprint(model),
    }
    if state.is_main_process and not (output_dir / PLAN).is_file():
        (output_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / PLAN, plan)
    state.wait_for_everyone()
    _check_plan(output_dir, plan)  # on every process after the barrier, so all raise together
    if (output_dir / MANIFEST).is_file():
        return output_dir if state.is_main_process else None  # finished earlier

    model.to(state.device)
    mine = process_chunks(num_chunks, state.process_index, state.num_processes)
    todo = [chunk for chunk in mine if not _chunk_path(output_dir, chunk).is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"Embedding {entity_type} chunks",
               disable=not (show_progress_bar and state.is_main_process))  # fmt: skip
    for chunk in todo:
        rows = chunk_rows(len(entities), chunk_size, chunk)
        vectors = model.encode(
            entities.rows(np.arange(rows.start, rows.stop)), batch_size=batch_size, show_progress_bar=False
        )  # (len(rows), dim)
        save_npy_atomically(_chunk_path(output_dir, chunk), np.ascontiguousarray(vectors, dtype=np.float32))
        bar.update(1)
    bar.close()
    record = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "chunks": list(mine),
        "embedded": todo,
    }
    (output_dir / PROCESSES).mkdir(exist_ok=True)
    _write_json(output_dir / PROCESSES / f"{state.process_index}.json", record)

    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _merge(output_dir, entities.ids.to_pylist(), num_chunks, plan)


def _chunk_path(output_dir: Path, chunk: int) -> Path:
    return output_dir / CHUNKS / f"{chunk:06d}.npy"


def _write_json(path: Path, content: dict) -> None:
    write_text_atomically(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def _check_plan(output_dir: Path, plan: dict) -> None:
    existing = json.loads((output_dir / PLAN).read_text())
    if existing != plan:
        changed = sorted(key for key in plan if existing.get(key) != plan[key])
        raise ValueError(
            f"{str(output_dir)!r} holds chunks of another run (different {changed}: {existing} vs {plan}). "
            "Use a new --out folder, or delete this one to recompute."
        )


def _merge(output_dir: Path, ids: list[str], num_chunks: int, plan: dict) -> Path:
    """Concatenate the chunks into ``embeddings.npy`` (streamed, memory is one chunk) and write the rest."""
    missing = [chunk for chunk in range(num_chunks) if not _chunk_path(output_dir, chunk).is_file()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} chunk(s) of {str(output_dir)!r} are missing at merge time (first: {missing[0]}); "
            "a process failed. Run the same command again to compute only those."
        )
    first = np.load(_chunk_path(output_dir, 0), mmap_mode="r", allow_pickle=False)
    dim = first.shape[1]

    def write_embeddings(tmp: str) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        for chunk in range(num_chunks):
            rows = chunk_rows(len(ids), plan["chunk_size"], chunk)
            merged[rows.start : rows.stop] = np.load(_chunk_path(output_dir, chunk), allow_pickle=False)
        merged.flush()
        del merged

    replace_atomically(output_dir / "embeddings.npy", write_embeddings)
    write_text_atomically(output_dir / "ids.json", json.dumps(ids, ensure_ascii=False))
    _write_json(output_dir / MANIFEST, {**plan, "dim": dim, "chunks": num_chunks})
    return output_dir


__all__ = [
    "ENTITY_MODEL_TYPES",
    "EntityEmbeddings",
    "chunk_rows",
    "embed_entity_table",
    "model_fingerprint",
    "process_chunks",
    "process_state",
]
