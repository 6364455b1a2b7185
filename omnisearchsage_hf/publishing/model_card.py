"""Model cards for published towers: YAML metadata, a ``model-index`` of the run's evaluation, usage, training.

Cards are rendered from the Markdown templates in ``omnisearchsage_hf/model_cards/`` (shipped in the
wheel as package data; ``$name`` placeholders, ``string.Template`` syntax). The metadata block is built
with ``huggingface_hub.ModelCardData``, so the ``model-index`` follows the Hub's schema: one result per
(task, metric) of the run's ``metrics.json`` as written by the trainer's evaluator
(``{task}[_{group}]_recall@{k}`` and ``{task}[_{group}]_mrr``). A card with no metrics says so and has
no ``model-index``: numbers are never invented.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from ..tokenization import OmniSearchSageTokenizer
from ..training.config import TaskConfig, TrainingConfig

CardKind = Literal["query", "entity", "query_document", "tokenizer"]
CARD_KINDS: tuple[str, ...] = ("query", "entity", "query_document", "tokenizer")
# Metric keys of `RecallEvaluator`: `{name}_recall@{k}` or `{name}_mrr`, name = task or task_group.
_METRIC_KEY = re.compile(r"^(?P<name>.+)_(?P<metric>recall@(?P<k>\d+)|mrr)$")
# Public sources of the real data sets the trainer reads (see ../shared/data/README.md).
_SOURCE_DATASETS = {
    "xquad_r": "google-research-datasets/lareqa",
    "amazon_pqa": "amazon-science/contextual-product-qa",
}
_SOURCE_LANGUAGES = {
    "xquad_r": ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"],
    "amazon_pqa": ["en"],
}
_METADATA = {
    "query": ("sentence-transformers", "sentence-similarity", ["sentence-transformers", "feature-extraction"]),
    "entity": ("transformers", "feature-extraction", ["hash-embedding"]),
    "query_document": ("sentence-transformers", "sentence-similarity", ["sentence-transformers", "asymmetric"]),
    "tokenizer": ("transformers", "feature-extraction", ["tokenizer", "n-grams"]),
}
_LIMITATIONS = """## Limitations

- Embeddings are only meaningful against embeddings of the same run: a query tower and an entity tower
  from different runs do not share a space.
- Quality is bounded by the training pairs: queries, languages and entity types that the training data
  did not cover are retrieved less well, and engagement-derived pairs carry the biases of past engagement
  (popularity, position, presentation).
- Recall@K above is measured against a sampled corpus of random candidates, as in the OmniSearchSage
  paper; it is not the recall of a production index over the full catalogue.
- The entity tower's n-gram vocabulary is fixed at training time: n-grams outside it are dropped (or
  hashed into a few shared buckets), so new words contribute little until the vocabulary is rebuilt."""
_CITATION = """## Citation

```bibtex
@inproceedings{agarwal2024omnisearchsage,
  title     = {OmniSearchSage: Multi-Task Multi-Entity Embeddings for Pinterest Search},
  author    = {Agarwal, Prabhat and SK, Minhazul Islam and Pancha, Nikil and Hazra, Kurchi Subhra and
               Xu, Jiajing and Rosenberg, Chuck},
  booktitle = {Companion Proceedings of the ACM Web Conference 2024},
  year      = {2024},
  url       = {https://arxiv.org/abs/2404.16260}
}
```"""


def load_template(kind: CardKind) -> Template:
    """The Markdown template of a card kind, read from the installed package's ``model_cards/`` folder."""
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown card kind {kind!r}; choose one of {CARD_KINDS}.")
    text = resources.files("omnisearchsage_hf").joinpath("model_cards", f"{kind}.md").read_text(encoding="utf-8")
    return Template(text)


def eval_results(metrics: Mapping[str, float], *, dataset_type: str = "held-out-pairs") -> list[EvalResult]:
    """One Hub ``EvalResult`` per evaluator metric, in sorted key order.

    Args:
        metrics: Flat ``{task}[_{group}]_recall@{k}`` / ``..._mrr`` values, as in a run's ``metrics.json``.
        dataset_type: The ``dataset.type`` of every result (the run's data source).

    Raises:
        ValueError: A key is not an evaluator metric (the message names it).
    """
    results = []
    for key in sorted(metrics):
        match = _METRIC_KEY.match(key)
        if match is None:
            raise ValueError(
                f"Metric {key!r} is not an evaluator metric: expected '<task>_recall@<k>' or '<task>_mrr'."
            )
        k = match["k"]
        results.append(
            EvalResult(
                task_type="retrieval",
                task_name="Retrieval",
                dataset_type=dataset_type,
                dataset_name=match["name"],
                # The Hub groups results by (task, dataset type, config, split): the task must be the config.
                dataset_config=match["name"],
                dataset_split="test",
                metric_type=f"recall_at_{k}" if k else "mrr",
                metric_name=f"Recall@{k}" if k else "MRR",
                metric_value=float(metrics[key]),
            )
        )
    return results


def _evaluation_section(metrics: Mapping[str, float] | None, training: TrainingConfig | None) -> str:
    if not metrics:
        return (
            "## Evaluation\n\nNo evaluation results: this model was published without an evaluation run "
            "(its run wrote no metrics), so this card reports none."
        )
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        match = _METRIC_KEY.match(key)
        rows.setdefault(match["name"], {})[match["metric"]] = value
    columns = sorted({m for row in rows.values() for m in row}, key=lambda m: (m == "mrr", len(m), m))
    lines = ["| Task | " + " | ".join(c.replace("recall", "Recall").replace("mrr", "MRR") for c in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for name in sorted(rows):
        lines.append(
            f"| {name} | " + " | ".join(f"{rows[name][c]:.4f}" if c in rows[name] else "" for c in columns) + " |"
        )
    corpus = f"{training.eval.corpus_size} random candidates" if training else "a sample of random candidates"
    return (
        "## Evaluation\n\nRecall@K and MRR of held-out (query, engaged candidate) pairs: the candidate is "
        f"ranked by dot product against {corpus} of the same type (OmniSearchSage paper §4.2), by "
        "`omnisearchsage_hf.evaluation.RecallEvaluator` at the end of training (the run's `metrics.json`). "
        "Both towers take part in every entity task.\n\n" + "\n".join(lines)
    )


def _hard_negatives(task: TaskConfig) -> str:
    """The task's hard negatives in words: how many per pair, and from where."""
    if not task.num_hard_negatives:
        return "0"
    if task.hard_negatives_group is not None:
        return f"{task.num_hard_negatives}, same `{task.hard_negatives_group}`"
    return f"{task.num_hard_negatives}, mined (`{Path(task.hard_negatives).name}`)"


def _training_section(training: TrainingConfig | None) -> str:
    if training is None:
        return "## Training\n\nThe training configuration of this model was not recorded with it."
    data, train, loss = training.data, training.train, training.loss
    source = data.source + (f" ({_SOURCE_DATASETS[data.source]})" if data.source in _SOURCE_DATASETS else "")
    tasks = ["| Task | Candidates | Share | Random negatives | Hard negatives per pair |", "|---|---|---|---|---|"]
    tasks += [
        f"| {t.name} | `{t.candidate}` | {t.share:g} | {t.num_random_negatives} | {_hard_negatives(t)} |"
        for t in data.tasks
    ]
    return (
        "## Training\n\n"
        "Multi-task sampled softmax with in-batch, random and (per task) hard negatives "
        f"(logQ correction: {loss.logq_correction}; Matryoshka dims: {loss.matryoshka_dims or 'none'}), "
        "trained with `omnisearchsage_hf.training.Trainer`.\n\n"
        f"- Data source: {source}\n"
        f"- Steps: {train.max_steps} x batch {train.batch_size} per process "
        f"(gradient accumulation {train.gradient_accumulation_steps}); learning rate {train.learning_rate:g}, "
        f"warmup {train.warmup_steps}, weight decay {train.weight_decay:g}, seed {train.seed}\n\n" + "\n".join(tasks)
    )


def _params(model: PreTrainedModel) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,}"


def _example_entity(config: Any) -> str:
    values = {"title": "antique copper bathroom sink", "description": "hammered copper vessel sink"}
    values.update({"board_titles": ["bathroom ideas"], "engaged_queries": ["copper sink"], "brand": "Acme"})
    parts = [f"{name!r}: {values[name]!r}" for name in config.text_fields if name in values]
    parts += [f"{name!r}: [0.1] * {dim}" for name, dim in config.dense_features.items()]
    return "{" + ", ".join(parts) + "}"


def _backbone_name(query_tower: OmniSearchSageQueryModel) -> str:
    name = getattr(query_tower.config.backbone_config, "_name_or_path", "") or ""
    return Path(name).name if name else query_tower.config.backbone_config.model_type


def _context(kind: CardKind, model: Any, repo_id: str, links: Mapping[str, str]) -> dict[str, Any]:
    """Template values of a card kind, from the published object."""
    context: dict[str, Any] = {"title": repo_id.rsplit("/", 1)[-1], "repo_id": repo_id}
    if kind in ("query", "query_document"):
        query_tower = model[0] if kind == "query_document" else model
        config = query_tower.config
        context |= {
            "backbone": _backbone_name(query_tower),
            "backbone_params": _params(query_tower.backbone),
            "pooling": config.pooling.upper() if config.pooling == "cls" else config.pooling,
            "out_dim": config.out_dim,
            "max_length": config.max_length,
            "query_prefix": f"`{config.query_prefix!r}`" if config.query_prefix else "none",
            "entity_link": f" ([{links['entity']}](https://huggingface.co/{links['entity']}))"
            if "entity" in links
            else "",
        }
    if kind in ("entity", "query_document"):
        entity_tower = model[1] if kind == "query_document" else model
        config = entity_tower.config
        context |= {
            "out_dim": config.out_dim,
            "text_fields": ", ".join(f"`{f}`" for f in config.text_fields) or "none",
            "dense_features": ", ".join(f"`{n}` ({d})" for n, d in config.dense_features.items()) or "none",
            "num_buckets": config.num_buckets,
            "embedding_dim": config.embedding_dim,
            "num_hashes": config.num_hashes,
            "vocab_size": config.vocab_size,
            "mlp": " → ".join(str(w) for w in [*config.hidden_dims, config.out_dim]),
            "parameters": _params(entity_tower),
            "example_entity": _example_entity(config),
            "query_link": f" ([{links['query']}](https://huggingface.co/{links['query']}))" if "query" in links else "",
        }
    if kind == "query_document":
        named = [f"[{links[k]}](https://huggingface.co/{links[k]})" for k in ("query", "entity") if k in links]
        context["tower_links"] = f" (also published as {' and '.join(named)})" if named else ""
    if kind == "tokenizer":
        tokens = model.vocabulary.tokens
        context |= {f"{k}_size": len(tokens[k]) for k in ("trigram", "unigram", "bigram")}
        context["vocab_size"] = f"{model.vocab_size} (including {model.vocabulary.oov_buckets} OOV buckets)"
    return context


def model_card(
    kind: CardKind,
    model: PreTrainedModel | PreTrainedTokenizerBase | tuple[OmniSearchSageQueryModel, OmniSearchSageEntityModel],
    repo_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    training_config: TrainingConfig | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    base_model: str | None = None,
    links: Mapping[str, str] | None = None,
) -> ModelCard:
    """Render the card of a published tower, tokenizer or query–document model.

    Args:
        kind: ``"query"``, ``"entity"``, ``"query_document"`` or ``"tokenizer"`` (the template used).
        model: The published object: a tower, the entity tokenizer, or ``(query_tower, entity_tower)``.
        repo_id: Hub repository (or local folder) the usage snippets load from.
        metrics: The run's evaluator metrics (``metrics.json``); None or empty: the card says there are none.
        training_config: The run's configuration, summarised under "Training" (also the default data
            source of ``datasets`` and ``languages``); None: the card says it was not recorded.
        license: SPDX-style Hub licence id. Default ``"apache-2.0"``.
        datasets: Hub ``datasets`` metadata; None derives it from the training data source.
        languages: Hub ``language`` metadata; None derives it from the data source (else ``["multilingual"]``).
        base_model: Hub id of the query backbone, for the ``base_model`` metadata (query cards only).
        links: Repository ids of sibling repos (``{"query": ..., "entity": ...}``), linked from the card.

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.save(path)`` writes ``README.md``.

    Example:
        ```python
        card = model_card("query", query_tower, "org/omnisearchsage-query", metrics={"query_pin_recall@10": 0.81})
        print(card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"])
        # 0.81
        ```
    """
    expected = {
        "query": OmniSearchSageQueryModel,
        "entity": OmniSearchSageEntityModel,
        "query_document": tuple,
        "tokenizer": OmniSearchSageTokenizer,
    }
    if kind in expected and not isinstance(model, expected[kind]):
        raise TypeError(f"A {kind!r} card describes a {expected[kind].__name__}, got {type(model).__name__}.")
    template = load_template(kind)
    library_name, pipeline_tag, tags = _METADATA[kind]
    source = training_config.data.source if training_config is not None else None
    if datasets is None:
        datasets = [_SOURCE_DATASETS[source]] if source in _SOURCE_DATASETS else None
    if languages is None:
        languages = _SOURCE_LANGUAGES.get(source) or (
            training_config.data.synthetic.get("languages") if source == "synthetic" else None
        )
    metrics = {} if kind == "tokenizer" else dict(metrics or {})
    data = ModelCardData(
        language=list(languages or ["multilingual"]),
        license=license,
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=["omnisearchsage", *tags, "retrieval", "custom_code"],
        datasets=list(datasets) if datasets else None,
        base_model=base_model if kind in ("query", "query_document") else None,
        model_name=repo_id.rsplit("/", 1)[-1],
        eval_results=eval_results(metrics, dataset_type=source or "held-out-pairs") or None,
    )
    body = template.substitute(
        _context(kind, model, repo_id, links or {}),
        evaluation=_evaluation_section(metrics, training_config),
        training=_training_section(training_config),
        limitations=_LIMITATIONS,
        citation=_CITATION,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


__all__ = ["CARD_KINDS", "CardKind", "eval_results", "load_template", "model_card"]
