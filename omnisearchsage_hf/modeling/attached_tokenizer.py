"""A tokenizer that travels with a model: loaded from and saved to the model's own folder.

Both towers embed raw inputs in ``encode`` (query strings, entity dicts), so each needs its tokenizer
after ``AutoModel.from_pretrained(folder)`` alone, the way users of the Hub expect. The tokenizer is a
plain attribute, never part of the state dict.

This file is copied next to the modeling files when a model is saved, so it imports only transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import has_file, logging

logger = logging.get_logger(__name__)

# `from_pretrained` keyword arguments that also say where and how to fetch the tokenizer.
_LOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
)
# `save_pretrained` keyword arguments that say where and how to push the folder.
_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "token")


def _has_tokenizer(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> bool:
    """Whether the folder or Hub repo ``path`` holds a saved tokenizer (its ``tokenizer_config.json``)."""
    filename = f"{subfolder}/tokenizer_config.json" if subfolder else "tokenizer_config.json"
    lookup_names = ("revision", "proxies", "token", "cache_dir", "local_files_only")
    return has_file(path, filename, **{name: hub_kwargs[name] for name in lookup_names if name in hub_kwargs})


def commit_folder(
    api: HfApi,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    extra_files: dict[str, bytes] | None = None,
    commit_message: str = "Upload OmniSearchSage model",
    **commit_kwargs: Any,
) -> CommitInfo:
    """Commit every file under ``folder`` (subfolders kept), plus ``extra_files``, to ``repo_id`` at once.

    The one way this package pushes to the Hub: a model's ``save_pretrained(push_to_hub=True)`` and
    ``publishing.push_folder`` both call it, so a repository never holds half of a folder.

    Args:
        api: The Hub client.
        folder: A saved model folder.
        repo_id: An existing repository.
        extra_files: ``path in repo → content`` added (or replacing a file of the folder), e.g. a card.
        commit_message: Message of the commit.
        commit_kwargs: Other ``HfApi.create_commit`` arguments (``revision``, ``create_pr``…).
    """
    folder, extra_files = Path(folder), dict(extra_files or {})
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in extra_files)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p) for p in files]
    operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in extra_files.items()]
    return api.create_commit(repo_id, operations, commit_message=commit_message, **commit_kwargs)


class AttachedTokenizerMixin:
    """Mixin for a ``PreTrainedModel`` whose ``tokenizer`` attribute is saved and loaded with it.

    ``from_pretrained`` loads ``AutoTokenizer`` from the same folder or Hub repo, with the same Hub
    arguments and ``trust_remote_code``; a folder without ``tokenizer_config.json`` loads with
    ``tokenizer = None`` and a warning. ``save_pretrained`` writes the tokenizer into the same folder
    (and, with ``push_to_hub=True``, pushes the whole folder to one repository in one commit).
    """

    tokenizer: PreTrainedTokenizerBase | None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        tokenizer_kwargs = {name: kwargs[name] for name in _LOAD_KWARGS if name in kwargs}
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if _has_tokenizer(pretrained_model_name_or_path, **tokenizer_kwargs):
            model.tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
        else:
            logger.warning(
                f"No tokenizer found in {os.fspath(pretrained_model_name_or_path)}: set `model.tokenizer` before "
                "calling `encode`."
            )
        return model

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Save the model, its tokenizer and ``_save_extra_files`` into one folder; push it all in one commit.

        With ``push_to_hub=True`` the folder is written first and then uploaded as a single commit to
        ``repo_id`` (default: the folder's name), so a Hub repo never holds a model without its tokenizer.
        """
        push_kwargs = {name: kwargs.pop(name) for name in _PUSH_KWARGS if name in kwargs}
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        self._save_extra_files(Path(save_directory))
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", Path(save_directory).name)
            api = HfApi(token=push_kwargs.pop("token", None))
            repo_id = api.create_repo(repo_id, private=push_kwargs.pop("private", None), exist_ok=True).repo_id
            commit_folder(api, save_directory, repo_id, **push_kwargs)

    def _save_extra_files(self, save_directory: Path) -> None:
        """Hook for files a model adds to its saved folder beyond weights, config, code and tokenizer."""
