"""An example query after training: a held-out query through the exported towers, loaded back from disk.

``omnisearchsage-train`` ends with it, so the first thing a new user sees is what the run produced doing
its job: the towers in ``output_dir`` load with ``AutoModel`` alone, and the engaged entity of a query
that training never saw is found among the catalogue's entities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import TrainingConfig
from .pairs import TrainingData
from .run_files import ENTITY_TOWER, QUERY_TOWER

MAX_CANDIDATES = 2000  # entities ranked for the example: the engaged one plus a seeded sample of the table


def print_example_query(output_dir: Path, data: TrainingData, config: TrainingConfig, *, top_k: int = 5) -> None:
    """Rank a sample of the first entity task's catalogue for its first held-out query; print the top ``top_k``."""
    task = next(
        (
            t
            for t in config.data.tasks
            if t.candidate.kind == "entity" and t.query_feature is None and data.eval_pairs.get(t.name)
        ),
        None,
    )
    if task is None or not (output_dir / QUERY_TOWER).is_dir() or not (output_dir / ENTITY_TOWER).is_dir():
        return
    from transformers import AutoModel

    import omnisearchsage_hf  # noqa: F401  (registers the towers with AutoModel)

    query_tower = AutoModel.from_pretrained(output_dir / QUERY_TOWER)
    entity_tower = AutoModel.from_pretrained(output_dir / ENTITY_TOWER)
    query, engaged = data.eval_pairs[task.name][0]
    table = data.tables[task.table]
    engaged_row = int(table.rows_of([engaged])[0])
    sample = np.random.default_rng(config.train.seed).permutation(len(table))[:MAX_CANDIDATES]
    rows = np.unique(np.append(sample, engaged_row))
    entities = table.rows(rows)
    scores = entity_tower.encode(entities, batch_size=256) @ query_tower.encode(query)  # (len(rows),)
    order = np.argsort(-scores, kind="stable")
    rank = int(np.flatnonzero(rows[order] == engaged_row)[0]) + 1
    print(f"\nExample: the held-out query {query!r} of task {task.name!r}, against {len(rows)} {task.table} entities")
    print(f"(towers loaded from {output_dir / QUERY_TOWER} and {output_dir / ENTITY_TOWER}):")
    for position in order[:top_k]:
        entity = entities[position]
        mark = "  <- engaged" if rows[position] == engaged_row else ""
        text = next((entity[f] for f in entity_tower.config.text_fields if entity.get(f)), "")
        text = f"  {str(text)[:60]!r}" if text else ""
        print(f"  {scores[position]:+.3f}  {entity['id']}{text}{mark}")
    print(f"The engaged entity {engaged!r} ranks {rank} of {len(rows)}.")


__all__ = ["print_example_query"]
