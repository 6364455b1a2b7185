"""Push towers, tokenizers and whole training runs to the Hugging Face Hub, each with a generated card.

Every push is one commit: the object is saved into a temporary folder (weights as safetensors, config,
remote code, tokenizer files, and for the query tower its sentence-transformers pipeline), the model card
is written as ``README.md``, and all files go up together through ``HfApi.create_commit``.
``publish(..., push=False, local_dir=...)`` writes a run's three repository folders exactly as they would
be pushed, without a token or a network.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..backends.export_files import copy_exports
from ..modeling import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from ..modeling.attached_tokenizer import commit_folder
from ..tokenization import OmniSearchSageTokenizer
from ..training.config import TrainingConfig, load_config
from ..training.run_files import ENTITY_TOWER, METRICS_FILE, QUERY_TOWER, read_run_config
from .model_card import CardKind, model_card
from .query_document import save_query_document_model

Publishable = PreTrainedModel | PreTrainedTokenizerBase


def card_kind(obj: Publishable) -> CardKind:
    """The card template that describes ``obj`` (raises ``TypeError`` for objects this package did not make)."""
    for cls, kind in (
        (OmniSearchSageQueryModel, "query"),
        (OmniSearchSageEntityModel, "entity"),
        (OmniSearchSageTokenizer, "tokenizer"),
    ):
        if isinstance(obj, cls):
            return kind
    raise TypeError(
        f"Cannot publish a {type(obj).__name__}: pass an OmniSearchSageQueryModel, OmniSearchSageEntityModel "
        "or OmniSearchSageTokenizer."
    )


def _card_file(card: ModelCard) -> dict[str, bytes]:
    """``{"README.md": bytes}``: the card as every push commits it and every local publication writes it."""
    return {"README.md": str(card).encode("utf-8")}


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card: ModelCard,
    commit_message: str = "Upload OmniSearchSage model",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Create ``repo_id`` if needed and commit every file under ``folder`` plus ``card`` as ``README.md``.

    Args:
        folder: A saved model folder; subfolders are kept (``backbone/``, ``2_Dense/``…).
        repo_id: ``"org/name"`` on the Hub.
        card: The model card; it replaces any ``README.md`` in ``folder``.
        commit_message: Message of the single commit.
        private: Visibility of a newly created repository (None: the account's default).
        token: Hub token (None: the logged-in token).
        revision: Branch to commit to (None: the default branch).
        create_pr: Open a pull request instead of committing to the branch.

    Returns:
        The ``CommitInfo`` of the commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return commit_folder(
        api,
        folder,
        repo_id,
        extra_files=_card_file(card),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    obj: Publishable,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **card_kwargs: Any,
) -> CommitInfo:
    """Push a query tower, an entity tower or an entity tokenizer to the Hub with its model card, in one commit.

    The object is saved with its own ``save_pretrained`` (so the repo holds exactly what a local save
    holds: for the query tower that includes the sentence-transformers files), and ``card`` (default: the
    card of its kind, see :func:`~omnisearchsage_hf.publishing.model_card`) becomes ``README.md``.

    Args:
        obj: The tower or tokenizer.
        repo_id: ``"org/name"`` on the Hub.
        card: A ready card; None renders the default one from ``card_kwargs``.
        private, token, revision, create_pr: As in :func:`push_folder`.
        **card_kwargs: ``model_card`` options (``metrics``, ``training_config``, ``license``, ``datasets``,
            ``languages``, ``base_model``, ``links``).

    Returns:
        The ``CommitInfo`` of the commit.

    Example:
        ```python
        push_to_hub(query_tower, "org/omnisearchsage-query", metrics=json.load(open("runs/x/metrics.json")))
        ```
    """
    kind = card_kind(obj)
    if card is None:
        card = model_card(kind, obj, repo_id, **card_kwargs)
    with tempfile.TemporaryDirectory() as folder:
        obj.save_pretrained(folder)
        return push_folder(
            folder,
            repo_id,
            card=card,
            commit_message=f"Upload OmniSearchSage {kind}",
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


@dataclass(frozen=True)
class _Repository:
    """One repository of a published run: its id, its card, and how to save its files into a folder."""

    repo_id: str
    card: ModelCard
    commit_message: str
    save: Callable[[Path], object]


def _save_query_tower(query_tower: OmniSearchSageQueryModel, source: Path, folder: Path) -> None:
    """Save the query tower, then carry over the run's ONNX / OpenVINO exports (``save_pretrained`` writes none)."""
    query_tower.save_pretrained(folder)
    copy_exports(source, folder)


def _run_repositories(
    output_dir: Path,
    repo_prefix: str,
    *,
    training_config: TrainingConfig | str | os.PathLike | None,
    license: str,
    datasets: Sequence[str] | None,
    languages: Sequence[str] | None,
    base_model: str | None,
) -> list[_Repository]:
    """The three repositories of the run in ``output_dir``, cards rendered (see :func:`publish`)."""
    for name in (QUERY_TOWER, ENTITY_TOWER):
        if not (output_dir / name / "config.json").is_file():
            raise FileNotFoundError(
                f"{output_dir / name} holds no saved tower: `output_dir` must be a finished run's output_dir "
                "(Trainer.train() exports query_tower/, entity_tower/ and metrics.json there)."
            )
    metrics_path = output_dir / METRICS_FILE
    metrics: Mapping[str, float] = (
        json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    )
    if training_config is None:
        training_config = read_run_config(output_dir)  # written by the Trainer, None for other folders
    elif not isinstance(training_config, TrainingConfig):
        training_config = load_config(training_config)
    query_tower = OmniSearchSageQueryModel.from_pretrained(output_dir / QUERY_TOWER)
    entity_tower = OmniSearchSageEntityModel.from_pretrained(output_dir / ENTITY_TOWER)

    repos = {"query": f"{repo_prefix}-query", "entity": f"{repo_prefix}-entity", "query_document": repo_prefix}
    card_kwargs = {
        "metrics": metrics,
        "training_config": training_config,
        "license": license,
        "datasets": datasets,
        "languages": languages,
        "base_model": base_model,
        "links": repos,
    }
    return [
        _Repository(
            repos["query"],
            model_card("query", query_tower, repos["query"], **card_kwargs),
            "Upload OmniSearchSage query",
            functools.partial(_save_query_tower, query_tower, output_dir / QUERY_TOWER),
        ),
        _Repository(
            repos["entity"],
            model_card("entity", entity_tower, repos["entity"], **card_kwargs),
            "Upload OmniSearchSage entity",
            entity_tower.save_pretrained,
        ),
        _Repository(
            repo_prefix,
            model_card("query_document", (query_tower, entity_tower), repo_prefix, **card_kwargs),
            "Upload OmniSearchSage query-document model",
            lambda folder: save_query_document_model(query_tower, entity_tower, folder),
        ),
    ]


def _write_repository(repository: _Repository, folder: Path) -> Path:
    """Write ``folder`` exactly as :func:`push_folder` commits it: the saved files, the card as ``README.md``.

    The files go into ``<folder>.partial``, which is renamed to ``folder`` once complete (an existing
    ``folder`` is moved aside first and then deleted), so an interrupted write never leaves an incomplete
    folder under the final name; a failed one removes its ``.partial`` folder and keeps the previous ``folder``.
    """
    partial, stale = folder.with_name(f"{folder.name}.partial"), folder.with_name(f"{folder.name}.old")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted earlier write
    partial.mkdir(parents=True)
    try:
        repository.save(partial)
        for path, data in _card_file(repository.card).items():
            (partial / path).write_bytes(data)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
        partial.rename(folder)
        shutil.rmtree(stale)
    else:
        partial.rename(folder)
    return folder


def publish(
    output_dir: str | os.PathLike,
    repo_prefix: str,
    *,
    push: bool = True,
    local_dir: str | os.PathLike | None = None,
    training_config: TrainingConfig | str | os.PathLike | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    base_model: str | None = None,
) -> dict[str, CommitInfo] | dict[str, Path]:
    """Publish a finished training run: three Hub repositories, each with its card and the run's metrics.

    Reads ``output_dir/query_tower``, ``output_dir/entity_tower`` and ``output_dir/metrics.json`` (as
    ``Trainer`` writes them) and publishes:

    - ``{repo_prefix}-query``: the query tower (transformers + sentence-transformers, no custom code for ST);
    - ``{repo_prefix}-entity``: the entity tower and its n-gram tokenizer (``trust_remote_code=True``);
    - ``{repo_prefix}``: both, as one sentence-transformers model with ``encode_query``/``encode_document``.

    Each repository's folder is written first, with the card as ``README.md``, and then committed as it is
    (one commit per repository, see :func:`push_folder`). With ``push=False`` nothing touches the network:
    the folders are only written, under ``local_dir/<repository name>``, so you can inspect or load exactly
    what would be pushed without a token.

    Args:
        output_dir: The run's ``output_dir``.
        repo_prefix: ``"org/name"``; the three repository ids derive from it.
        push: Push to the Hub (default). False: only write the folders into ``local_dir``.
        local_dir: Where the folders are written, one per repository named after it (``"org/name-query"`` →
            ``local_dir/name-query/``; an existing folder of that name is replaced). Required with
            ``push=False``; with ``push=True`` the pushed folders are kept there (None: a temporary folder).
        training_config: The run's ``TrainingConfig`` or its YAML path, summarised in the cards; None: the
            ``training_config.yaml`` the Trainer wrote into ``output_dir``, and if there is none, the cards
            say the configuration was not recorded.
        private, token: As in :func:`push_folder` (unused with ``push=False``).
        license, datasets, languages, base_model: Card metadata (see ``model_card``).

    Returns:
        With ``push=True``, ``{repo_id: CommitInfo}`` of the three commits; with ``push=False``,
        ``{repo_id: Path}`` of the three written folders.

    Raises:
        ValueError: ``push=False`` without ``local_dir``.
        FileNotFoundError: A tower folder is missing from ``output_dir``.

    Example:
        ```python
        publish("runs/xquad_r", "org/omnisearchsage-xquad", training_config="training/configs/xquad_r.yaml")
        # Offline: the same three folders, README.md included, without a token or a network.
        folders = publish("runs/xquad_r", "org/omnisearchsage-xquad", push=False, local_dir="published")
        print(folders["org/omnisearchsage-xquad-query"])  # published/omnisearchsage-xquad-query
        ```
    """
    if not push and local_dir is None:
        raise ValueError(
            "publish(push=False) writes the repositories' folders locally: pass `local_dir`, the folder to write "
            "them into (e.g. local_dir='published/')."
        )
    repositories = _run_repositories(
        Path(output_dir),
        repo_prefix,
        training_config=training_config,
        license=license,
        datasets=datasets,
        languages=languages,
        base_model=base_model,
    )
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        parent = Path(scratch if local_dir is None else local_dir)
        for repository in repositories:
            folder = _write_repository(repository, parent / repository.repo_id.rsplit("/", 1)[-1])
            results[repository.repo_id] = (
                push_folder(
                    folder,
                    repository.repo_id,
                    card=repository.card,
                    commit_message=repository.commit_message,
                    private=private,
                    token=token,
                )
                if push
                else folder
            )
    return results


__all__ = ["card_kind", "publish", "push_folder", "push_to_hub"]
