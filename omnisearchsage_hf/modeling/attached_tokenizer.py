"""A tokenizer that travels with a model: loaded from and saved to the model's own folder.

Both towers embed raw inputs in ``encode`` (query strings, entity dicts), so each needs its tokenizer
after ``AutoModel.from_pretrained(folder)`` alone, the way users of the Hub expect. The tokenizer is a
plain attribute, never part of the state dict.

Saving also records the checksums of every file written (``saved_folder.py``), and loading checks the
folder against them, and the tokenizer against the model, before anything is embedded.

This file is copied next to the modeling files when a model is saved, so it imports only transformers
and its flat siblings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from .saved_folder import (
    HUB_KWARGS,
    check_folder,
    folder_resolver,
    local_resolver,
    weight_file_names,
    write_checksums,
)

logger = logging.get_logger(__name__)

# `from_pretrained` keyword arguments that also say where and how to fetch the tokenizer.
_LOAD_KWARGS = (*HUB_KWARGS, "trust_remote_code")
# `save_pretrained` keyword arguments that say where and how to push the folder.
_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "token")


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

    ``from_pretrained`` first checks the folder (``saved_folder.check_folder``: checksums, JSON, config
    fields, weight headers), then loads ``AutoTokenizer`` from the same folder or Hub repo, with the same
    Hub arguments and ``trust_remote_code``, and checks that it fits the model with the model class's
    ``_check_loaded_tokenizer(location, resolve)``, which raises if it cannot be this model's tokenizer;
    a folder without ``tokenizer_config.json`` loads with ``tokenizer = None`` and a warning.
    ``save_pretrained`` writes the tokenizer into the same folder, then ``checksums.json`` (and, with
    ``push_to_hub=True``, pushes the whole folder to one repository in one commit).
    """

    tokenizer: PreTrainedTokenizerBase | None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        tokenizer_kwargs = {name: kwargs[name] for name in _LOAD_KWARGS if name in kwargs}
        location = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            location = os.path.join(location, kwargs["subfolder"])
        resolve = folder_resolver(pretrained_model_name_or_path, **kwargs)
        check_folder(resolve, location, cls.config_class)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if resolve("tokenizer_config.json") is not None:
            model.tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
            model._check_loaded_tokenizer(location, resolve)
        else:
            logger.warning(f"No tokenizer found in {location}: set `model.tokenizer` before calling `encode`.")
        return model

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Save the model, its tokenizer and ``_save_extra_files`` into one folder; push it all in one commit.

        The last file written is ``checksums.json`` (size and sha256 of every other file written, each
        given the mode the umask allows), which ``from_pretrained`` checks. With ``push_to_hub=True`` the
        folder is written first and then uploaded as a single commit to ``repo_id`` (default: the folder's
        name), so a Hub repo never holds a model without its tokenizer.
        """
        push_kwargs = {name: kwargs.pop(name) for name in _PUSH_KWARGS if name in kwargs}
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        folder = Path(save_directory)
        written = ["config.json", *weight_file_names(local_resolver(folder))]
        if self.tokenizer is not None:
            # `save_pretrained` also lists files it had nothing to write into (an empty `added_tokens.json`).
            saved = [Path(path) for path in self.tokenizer.save_pretrained(folder)]
            written += [path.relative_to(folder).as_posix() for path in saved if path.is_file()]
        written += self._save_extra_files(folder)
        write_checksums(folder, written)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", Path(save_directory).name)
            api = HfApi(token=push_kwargs.pop("token", None))
            repo_id = api.create_repo(repo_id, private=push_kwargs.pop("private", None), exist_ok=True).repo_id
            commit_folder(api, save_directory, repo_id, **push_kwargs)

    def _save_extra_files(self, save_directory: Path) -> list[str]:
        """Hook for files a model adds to its saved folder beyond weights, config, code and tokenizer.

        Returns their paths relative to ``save_directory`` (recorded in ``checksums.json``).
        """
        return []
