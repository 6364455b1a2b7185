"""Zero-shot sentence encoders from local model folders, and the passage embeddings they give table columns.

``load_sentence_encoder`` builds a normalised sentence-transformers model from a local folder (a
sentence-transformers folder as saved, a plain transformers encoder as ``Transformer → Pooling →
Normalize``). ``passage_embeddings`` encodes texts with one, cached on disk: the data modules use it for
pre-existing embedding columns (e.g. the multilingual-e5 ``compat`` feature), and the zero-shot baselines
of ``omnisearchsage_hf.evaluation.baselines`` load their encoders with ``load_sentence_encoder``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from ..atomic import save_npy_atomically

Pooling = Literal["mean", "cls"]
# A folder of local model copies, one subfolder per model named like the Hub id's last part
# (`intfloat/multilingual-e5-small` -> `$OMNISEARCHSAGE_MODELS/multilingual-e5-small`).
MODELS_ENV = "OMNISEARCHSAGE_MODELS"


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Where to load a model named in a config from: a local folder when there is one, else the Hub id.

    ``name_or_path`` itself when it is a folder (``~`` and ``$VARS`` expanded); else, when the environment
    variable ``OMNISEARCHSAGE_MODELS`` names a folder holding a subfolder called like the id's last part,
    that subfolder; else the name unchanged, for ``from_pretrained`` to fetch from the Hub. Configs name
    Hub ids, and a machine without the Hub points ``OMNISEARCHSAGE_MODELS`` at its copies.

    Example:
        ::

            os.environ["OMNISEARCHSAGE_MODELS"] = "/models"   # holding /models/multilingual-e5-small
            resolve_model("intfloat/multilingual-e5-small")  # '/models/multilingual-e5-small'
    """
    path = os.path.expandvars(os.path.expanduser(str(name_or_path)))
    if Path(path).is_dir():
        return path
    local_root = os.environ.get(MODELS_ENV)
    if local_root:
        local = Path(os.path.expanduser(local_root)) / Path(path).name
        if local.is_dir():
            return str(local)
    return path


def load_sentence_encoder(folder: str | Path, *, pooling: Pooling = "mean", max_length: int = 128):
    """A ``SentenceTransformer`` from a local folder, normalised.

    A sentence-transformers folder (with ``modules.json``) loads as saved; a plain transformers encoder
    folder becomes ``Transformer(max_length) → Pooling(pooling) → Normalize``.

    Args:
        folder: Local model folder (``python ../shared/tools/backbones.py me5|minilm`` prints one).
        pooling: Pooling of a plain encoder folder.
        max_length: Token limit of a plain encoder folder.
    """
    # Imported here: sentence-transformers takes seconds to import, and only loading an encoder needs it.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = Path(resolve_model(folder))
    if not path.is_dir():  # a Hub id without a local copy: its own sentence-transformers pipeline
        return SentenceTransformer(str(folder), device="cpu")
    path = path.resolve()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise FileNotFoundError(f"Encoder folder {str(folder)!r} holds no config.json or modules.json.")
    if (path / "modules.json").is_file():
        return SentenceTransformer(str(path), device="cpu")
    transformer = Transformer(str(path), max_seq_length=max_length)
    return SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling), Normalize()], device="cpu"
    )


def passage_embeddings(
    texts: Sequence[str],
    encoder: str | Path,
    *,
    prefix: str = "passage: ",
    max_length: int = 128,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Zero-shot embeddings of ``prefix + text`` by a local Hugging Face encoder folder, cached on disk.

    The encoder runs as sentence-transformers ``Transformer → mean Pooling → Normalize``, which is how
    multilingual-e5 is used (``python ../shared/tools/backbones.py me5`` prints its folder). With a
    ``cache_dir`` the result is stored as ``{cache_dir}/passages-{fingerprint}.npy`` (written whole,
    then renamed) and read back by any later call with the same encoder folder, prefix, length and texts.

    Returns:
        ``(len(texts), dim)`` float32, unit-norm rows.
    """
    folder = Path(resolve_model(encoder)).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"`compat_encoder` {str(encoder)!r} is not a model folder (no config.json): pass a local folder, or "
            f"set {MODELS_ENV} to a folder holding a copy named {Path(str(encoder)).name!r}."
        )
    digest = hashlib.sha256(json.dumps([str(folder), prefix, max_length]).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    cache = Path(cache_dir) / f"passages-{digest.hexdigest()[:20]}.npy" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    model = load_sentence_encoder(folder, pooling="mean", max_length=max_length)
    if show_progress_bar:  # says what the sentence-transformers "Batches" bar below is encoding
        where = f"cached in {cache.parent}" if cache is not None else "not cached"
        tqdm.write(f"Encoding {len(texts)} passages with {folder.name} ({where}):", file=sys.stderr)
    # One call: sentence-transformers sorts the whole input by length, so the padding (and the floats) match
    # any earlier run on the same texts.
    embeddings = model.encode(
        [prefix + text for text in texts], batch_size=batch_size, show_progress_bar=show_progress_bar
    ).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomically(cache, embeddings)
    return embeddings


__all__ = ["MODELS_ENV", "Pooling", "load_sentence_encoder", "passage_embeddings", "resolve_model"]
