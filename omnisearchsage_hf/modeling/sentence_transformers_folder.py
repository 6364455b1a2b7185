"""The sentence-transformers view of a saved query tower: ``SentenceTransformer(folder)`` with no custom code.

``OmniSearchSageQueryModel.save_pretrained`` calls ``write_sentence_transformers_files`` after writing the
weights and the tokenizer, so every saved query tower is also a sentence-transformers model built from
built-in modules only. This file is copied into saved folders with the modeling files, so it imports only
torch, transformers, huggingface_hub and its flat siblings.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import save_torch_state_dict

from .saved_folder import local_resolver, weight_file_names

# Subfolder of a saved tower that sentence-transformers' `Transformer` module loads the backbone from.
SENTENCE_TRANSFORMERS_BACKBONE = "backbone"


def _write_json(path: Path, data: dict | list) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_sentence_transformers_files(model: Any, folder: str | os.PathLike) -> list[str]:
    """Make a folder written by ``save_pretrained`` loadable by ``SentenceTransformer(folder)`` too.

    The pipeline uses built-in sentence-transformers 6 modules only, so it needs no ``trust_remote_code``:
    ``Transformer`` in ``backbone/`` → ``Pooling`` (the tower's ``cls``/``mean``) → ``Dense`` (the projection,
    identity activation) → ``Normalize``; ``query_prefix`` becomes the ``query`` and ``document`` prompts
    (with ``default_prompt_name="query"``), so ``encode``, ``encode_query`` and ``encode_document`` all embed
    exactly as the tower's ``encode`` does, and ``max_length`` becomes ``max_seq_length``.

    ``backbone/`` holds a second copy of the backbone weights, as a plain checkpoint of the backbone's own
    architecture: sentence-transformers' ``Transformer`` can only read a weights file inside its folder, and
    pointing it at the tower's ``../model.safetensors`` works for local folders but not for Hub repos
    (huggingface_hub rejects ``..`` in file names). The projection is likewise copied into ``2_Dense/``.

    Args:
        model: The ``OmniSearchSageQueryModel`` whose folder this is.
        folder: A folder that ``model.save_pretrained`` has just written.

    Returns:
        The files written, relative to ``folder`` (for ``checksums.json``).
    """
    folder = Path(folder)
    backbone_dir = folder / SENTENCE_TRANSFORMERS_BACKBONE
    backbone_dir.mkdir(exist_ok=True)
    model.backbone.save_pretrained(backbone_dir)
    written = [backbone_dir / name for name in ("config.json", *weight_file_names(local_resolver(backbone_dir)))]
    if model.tokenizer is not None:
        written += [path for path in map(Path, model.tokenizer.save_pretrained(backbone_dir)) if path.is_file()]
    model_kwargs = {}
    if "add_pooling_layer" in inspect.signature(type(model.backbone).__init__).parameters:
        model_kwargs["add_pooling_layer"] = False  # the tower dropped the pooler; do not re-create it at random
    written.append(backbone_dir / "sentence_bert_config.json")
    _write_json(
        backbone_dir / "sentence_bert_config.json",
        {
            "max_seq_length": model.config.max_length,
            "model_kwargs": model_kwargs,
            "transformer_task": "feature-extraction",
        },
    )

    hidden, out_dim = model.config.backbone_config.hidden_size, model.config.out_dim
    modules = [
        (SENTENCE_TRANSFORMERS_BACKBONE, "sentence_transformers.base.modules.transformer.Transformer", None),
        (
            "1_Pooling",
            "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
            {"embedding_dimension": hidden, "pooling_mode": model.config.pooling, "include_prompt": True},
        ),
        (
            "2_Dense",
            "sentence_transformers.base.modules.dense.Dense",
            {
                "in_features": hidden,
                "out_features": out_dim,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        ),
        ("3_Normalize", "sentence_transformers.base.modules.normalize.Normalize", {}),
    ]
    for path, _, config in modules[1:]:
        (folder / path).mkdir(exist_ok=True)
        _write_json(folder / path / "config.json", config)
        written.append(folder / path / "config.json")
    projection = {"linear.weight": model.projection.weight, "linear.bias": model.projection.bias}
    save_torch_state_dict({k: v.detach().contiguous() for k, v in projection.items()}, folder / "2_Dense")
    written += [
        folder / "2_Dense" / "model.safetensors",
        folder / "modules.json",
        folder / "config_sentence_transformers.json",
    ]
    _write_json(
        folder / "modules.json",
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind, _) in enumerate(modules)],
    )
    prefix = model.config.query_prefix
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {"pytorch": torch.__version__, "transformers": transformers.__version__},
            "default_prompt_name": "query" if prefix else None,
            "model_type": "SentenceTransformer",
            # Query candidates (query→query retrieval) are embedded like queries, prefix included.
            "prompts": {"document": prefix, "query": prefix},
            "similarity_fn_name": "cosine",
        },
    )
    return [path.relative_to(folder).as_posix() for path in written]


__all__ = ["SENTENCE_TRANSFORMERS_BACKBONE", "write_sentence_transformers_files"]
