"""Both towers as one asymmetric sentence-transformers model: ``encode_query(texts)``, ``encode_document(entities)``.

The saved folder holds the two tower folders unchanged, ``query/`` and ``document/`` (with this
package, ``AutoModel.from_pretrained(folder, subfolder="query")``; without it, load the subfolder's own
path with ``trust_remote_code=True``: transformers fetches remote code from a repo's root only), plus the
files of a sentence-transformers ``Router`` whose ``query`` route is the query tower's built-in pipeline
(``query/backbone`` Transformer, Pooling, Dense, Normalize, read in place from the tower's folder) and
whose ``document`` route is :class:`OmniSearchSageEntityModule`. The entity side is custom code, so the
model loads with ``SentenceTransformer(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import sentence_transformers
import torch
import transformers

from ..modeling import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from . import entity_module
from .entity_module import OmniSearchSageEntityModule

QUERY, DOCUMENT = "query", "document"


def _write_json(path: Path, data: dict | list) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_query_document_model(
    query_tower: OmniSearchSageQueryModel, entity_tower: OmniSearchSageEntityModel, folder: str | os.PathLike
) -> Path:
    """Save both towers as one sentence-transformers model with a ``Router`` (query vs document route).

    ``SentenceTransformer(folder, trust_remote_code=True)`` then embeds texts with ``encode_query`` (the
    query tower, ``query_prefix`` applied as the ``query`` prompt) and entity dicts with ``encode_document``
    (the entity tower). Always name the task (or call ``encode(..., task="document")``): sentence-transformers
    reads a list of dicts given to a plain ``encode`` as legacy ``{task: input}`` pairs. Both return unit
    vectors in the same space, so ``model.similarity(queries, documents)`` ranks entities for each query.

    Args:
        query_tower: The query tower, with its tokenizer attached.
        entity_tower: The entity tower, with its n-gram tokenizer attached; ``out_dim`` must match.
        folder: Output folder (created; existing files with the same names are overwritten).

    Returns:
        The folder.

    Raises:
        ValueError: The towers' ``out_dim`` differ, or either tower has no tokenizer.

    Example:
        ```python
        save_query_document_model(query_tower, entity_tower, "omnisearchsage-st")
        model = SentenceTransformer("omnisearchsage-st", trust_remote_code=True)
        scores = model.similarity(model.encode_query(["copper sink"]), model.encode_document([{"title": "sink"}]))
        ```
    """
    if query_tower.config.out_dim != entity_tower.config.out_dim:
        raise ValueError(
            f"The towers must share `out_dim` to be scored against each other: query tower "
            f"{query_tower.config.out_dim}, entity tower {entity_tower.config.out_dim}."
        )
    for name, tower in (("query_tower", query_tower), ("entity_tower", entity_tower)):
        if tower.tokenizer is None:
            raise ValueError(f"`{name}.tokenizer` is None: attach the tokenizer the tower was trained with.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    query_tower.save_pretrained(folder / QUERY)
    entity_tower.save_pretrained(folder / DOCUMENT)
    shutil.copyfile(entity_module.__file__, folder / Path(entity_module.__file__).name)

    # The query route is the query tower's own sentence-transformers pipeline, read in place from query/.
    query_modules = json.loads((folder / QUERY / "modules.json").read_text(encoding="utf-8"))
    query_types = {f"{QUERY}/{module['path']}": module["type"] for module in query_modules}
    query_ids = list(query_types)
    # Relative to the folder root, where sentence-transformers imports it from (trust_remote_code).
    document_type = f"{Path(entity_module.__file__).stem}.{OmniSearchSageEntityModule.__name__}"
    router_config = {
        "types": {**query_types, DOCUMENT: document_type},
        "structure": {QUERY: query_ids, DOCUMENT: [DOCUMENT]},
        "parameters": {"default_route": DOCUMENT, "allow_empty_key": True, "route_mappings": {}},
    }
    _write_json(folder / "router_config.json", router_config)
    _write_json(
        folder / "modules.json",
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.router.Router"}],
    )
    prefix = query_tower.config.query_prefix
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {
                "pytorch": torch.__version__,
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
            },
            "default_prompt_name": None,
            "model_type": "SentenceTransformer",
            "prompts": {DOCUMENT: "", QUERY: prefix},
            "similarity_fn_name": "cosine",
        },
    )
    return folder


__all__ = ["DOCUMENT", "QUERY", "save_query_document_model"]
