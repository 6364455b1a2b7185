"""``omnisearchsage-mine``: mine hard negatives for one task of a training config, with the trainer's ids.

    omnisearchsage-mine --config xquad_r --task query_sentence --out runs/hn/query_sentence.parquet \\
        --encoder intfloat/multilingual-e5-small --query-prefix "query: " --passage-prefix "passage: " \\
        --rank-range 10 100 --num-negatives 8 --relative-margin 0.05
    omnisearchsage-mine --config xquad_r --task query_sentence --out runs/hn/q.parquet --run runs/xquad_r

The task's pairs and candidate table are read through the same preparation the trainer runs (the data
source under ``<output_dir>/data``, ``data.embedding_sources``), so the mined ids are the ids the trainer
maps. Every pair of the task's pair file is a known positive, never mined. The encoder is either zero-shot
(``--encoder``: a local sentence encoder folder or a name ``OMNISEARCHSAGE_MODELS`` resolves; the candidate
text is ``--text-field``, or ``--candidate-feature`` names a column that already holds its embeddings) or a
finished run's towers (``--run``: its query tower, and its entity tower for
``entity:`` tasks or the table's fixed embedding for ``compat:`` tasks). The table goes to ``--out``
(parquet, written atomically); the command prints the task keys that train with it. Config keys can be
overridden as for training (``--section.key value``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..cli_errors import run_command
from ..data.hard_negatives import NEGATIVES_COLUMN, check_mining_options, mine_hard_negatives, write_hard_negatives
from ..data.tables import EntityTable, check_columns
from .builders import entity_config
from .command import resolve_config
from .config import TaskConfig, TrainingConfig, load_config, parse_overrides
from .pairs import read_pairs
from .run_files import DATA, ENTITY_TOWER, QUERY_TOWER
from .sources import embed_sources, prepare_source, tower_rows

PROG = "omnisearchsage-mine"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mine hard negatives for one task of a training config (a table for `hard_negatives`).",
        epilog="Any other config key: --section.key VALUE (read as YAML), as for omnisearchsage-train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a bundled config name or a YAML file")
    parser.add_argument("--task", required=True, help="the task to mine for (an entity: or compat: task)")
    parser.add_argument("--out", required=True, help="the table to write (parquet)")
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument(
        "--encoder", help="zero-shot: a sentence encoder folder (or a name OMNISEARCHSAGE_MODELS holds)"
    )
    encoder.add_argument("--run", help="a finished run folder: mine with its trained towers")
    parser.add_argument("--output_dir", help="the run folder whose data/ holds the prepared source (config default)")
    parser.add_argument("--rank-range", type=int, nargs=2, default=(10, 100), metavar=("START", "STOP"))
    parser.add_argument("--num-negatives", type=int, default=8, help="negatives kept per query (default 8)")
    parser.add_argument("--absolute-margin", type=float, help="drop candidates scoring above s+ - margin")
    parser.add_argument("--relative-margin", type=float, help="drop candidates scoring above s+ - |s+| * margin")
    parser.add_argument(
        "--exclude-same",
        metavar="COLUMN",
        help="never mine a candidate that shares its value of this column of the candidate table with a positive "
        "(e.g. a key shared by a sentence's translations: they are relevant to a cross-lingual search)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="texts or queries per batch (default 256)")
    parser.add_argument("--text-field", help="--encoder: the candidate column to embed (default: first text field)")
    parser.add_argument(
        "--candidate-feature",
        help="--encoder: use this pre-existing embedding column as the candidates' embeddings instead of encoding "
        "text (e.g. e5_embedding when --encoder is the model that computed it: only the queries are encoded)",
    )
    parser.add_argument("--query-prefix", default="", help='--encoder: prepended to queries (e5: "query: ")')
    parser.add_argument("--passage-prefix", default="", help='--encoder: prepended to candidates (e5: "passage: ")')
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def find_task(config: TrainingConfig, name: str) -> TaskConfig:
    """The task called ``name``; it must have table rows as candidates and text queries."""
    tasks = {task.name: task for task in config.data.tasks}
    if name not in tasks:
        raise ValueError(f"--task {name!r} is not a task of the config; its tasks: {sorted(tasks)}.")
    task = tasks[name]
    if task.candidate.kind == "query":
        raise ValueError(f"Task {name!r} has query candidates ({task.candidate}); mining needs entity: or compat:.")
    if task.query_feature is not None:
        raise ValueError(f"Task {name!r} has fixed query vectors (`query_feature`); mining needs text queries.")
    return task


def candidate_table(config: TrainingConfig, task: TaskConfig) -> tuple[EntityTable, Path]:
    """The task's candidate table as the trainer reads it, and the folder its pair paths are relative to."""
    data_dir = Path(config.output_dir) / DATA
    prepare_source(config, data_dir)
    base = Path(".") if config.data.source == "files" else data_dir
    embedded = embed_sources(config, base, data_dir)
    path = embedded.get(task.table, base / config.data.entities[task.table])
    return EntityTable.read(path, name=task.table), base


def known_positives(path: Path, task: TaskConfig) -> dict[str, set[str]]:
    """Query text → every candidate id it is paired with in the pair file (no popularity cap)."""
    positives: dict[str, set[str]] = {}
    for queries, candidate_ids in read_pairs(path, task=task.name, engagements=task.engagements):
        for query, candidate_id in zip(queries.to_pylist(), candidate_ids.to_pylist(), strict=True):
            positives.setdefault(query, set()).add(candidate_id)
    return positives


def same_value_ids(table: EntityTable, column: str, positives: dict[str, set[str]]) -> dict[str, set[str]]:
    """Query → the ids that share a positive's value of ``column`` (a null value is shared with nobody)."""
    check_columns(table.table.schema, [column], f"--exclude-same: table {table.name!r}")
    value_of = dict(zip(table.ids.to_pylist(), table.table.column(column).to_pylist(), strict=True))
    members: dict[object, set[str]] = {}
    for entity_id, value in value_of.items():
        if value is not None:
            members.setdefault(value, set()).add(entity_id)
    excluded = {}
    for query, ids in positives.items():
        values = {value_of.get(entity_id) for entity_id in ids} - {None}
        excluded[query] = set().union(*(members[value] for value in values))
    return excluded


def zero_shot_embeddings(args: argparse.Namespace, config: TrainingConfig, table: EntityTable, queries: list[str]):
    """``(queries, candidates)`` embeddings by the ``--encoder`` sentence encoder (or ``--candidate-feature``)."""
    from ..data.encoders import load_sentence_encoder

    encoder = load_sentence_encoder(args.encoder)
    options = {"batch_size": args.batch_size, "normalize_embeddings": True, "show_progress_bar": True}
    query_embeddings = encoder.encode([args.query_prefix + q for q in queries], **options)
    if args.candidate_feature is not None:
        return query_embeddings, fixed_embeddings(table, args.candidate_feature)
    field = args.text_field or next(
        (name for name in entity_config(config.model).text_fields if name in table.table.column_names), None
    )
    if field is None or field not in table.table.column_names:
        raise ValueError(
            f"--text-field {field!r} is not a column of table {table.name!r}; it has {table.table.column_names}."
        )
    texts = [args.passage_prefix + (text or "") for text in table.table.column(field).to_pylist()]
    return query_embeddings, encoder.encode(texts, **options)


def fixed_embeddings(table: EntityTable, feature: str) -> np.ndarray:
    """``(rows, dim)`` the table's pre-existing embedding column ``feature``, every row."""
    return table.dense(feature, np.arange(len(table)), table.feature_dim(feature))


def run_embeddings(run: Path, task: TaskConfig, table: EntityTable, queries: list[str]):
    """``(queries, candidates)`` embeddings by a finished run's towers (a compat task: the fixed vectors)."""
    from transformers import AutoModel

    query_tower = AutoModel.from_pretrained(run / QUERY_TOWER)
    if task.candidate.kind == "compat":
        candidates = fixed_embeddings(table, task.candidate.feature)  # (rows, dim)
    else:
        entity_tower = AutoModel.from_pretrained(run / ENTITY_TOWER)
        rows = tower_rows(table, entity_tower)
        candidates = entity_tower.encode(rows.to_records(), batch_size=256, show_progress_bar=True)
    dim = candidates.shape[1]
    truncate = dim if dim < query_tower.config.out_dim else None  # a narrower legacy space: the Matryoshka prefix
    return query_tower.encode(queries, batch_size=128, truncate_dim=truncate, show_progress_bar=True), candidates


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, mine, write the table, and print the task keys that use it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)

    def mine() -> int:
        margins = args.absolute_margin, args.relative_margin
        check_mining_options(tuple(args.rank_range), args.num_negatives, *margins)  # before any slow step
        overrides = parse_overrides(rest)
        if args.output_dir is not None:
            overrides["output_dir"] = args.output_dir
        config = load_config(resolve_config(args.config), overrides)
        task = find_task(config, args.task)
        table, base = candidate_table(config, task)
        positives = known_positives(base / task.pairs, task)
        queries = sorted(positives)
        if args.run is not None:
            query_embeddings, candidates = run_embeddings(Path(args.run), task, table, queries)
        else:
            query_embeddings, candidates = zero_shot_embeddings(args, config, table, queries)
        mined = mine_hard_negatives(
            queries,
            query_embeddings,
            table.ids.to_pylist(),
            candidates,
            positives,
            excluded=same_value_ids(table, args.exclude_same, positives) if args.exclude_same else None,
            rank_range=tuple(args.rank_range),
            num_negatives=args.num_negatives,
            absolute_margin=margins[0],
            relative_margin=margins[1],
            batch_size=args.batch_size,
        )
        path = write_hard_negatives(mined, args.out)
        counts = np.array([len(ids) for ids in mined.column(NEGATIVES_COLUMN).to_pylist()])
        print(
            f"Wrote {path}: {len(counts)} queries, {counts.mean():.2f} negatives per query on average, "
            f"{int((counts < args.num_negatives).sum())} with fewer than {args.num_negatives}. To train with it, "
            f"add to task {task.name!r}: {{num_hard_negatives: {min(4, args.num_negatives)}, hard_negatives: {path}}}"
        )
        return 0

    return run_command(PROG, mine, argv)


__all__ = ["PROG", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
