"""Shared test helpers: a subprocess without this package, a tiny pretrained-style text backbone, a tiny
entity tower with sample entities, and a tiny BLIP captioner with random images.
"""

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from omnisearchsage_hf import OmniSearchSageEntityConfig, OmniSearchSageEntityModel, build_vocab

# Run first in every `run_without_package` script: `import omnisearchsage_hf` then raises ImportError.
_BLOCK_PACKAGE = 'import sys\nsys.modules["omnisearchsage_hf"] = None\n'

# A WordPiece vocabulary small enough to read, covering the scripts the tests embed.
TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", "passage", ":", ".", ",", "!", "?", "-"]
    + ["antique", "copper", "bathroom", "sink", "kitchen", "lamp", "red", "dress", "summer", "shoes", "wall", "art"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + list("日本語中文字台灯")
    + list("กขคงจ")
    + ["##" + c for c in "ากขคงจ"]
    + list("مرحبا")
    + ["##" + c for c in "مرحبا"]
)


def run_without_package(script: str, tmp_path: Path, timeout: float = 300) -> str:
    """Run a Python ``script`` in a fresh interpreter where ``omnisearchsage_hf`` cannot be imported.

    The interpreter is offline (``HF_HUB_OFFLINE=1``) and keeps its Hub cache and dynamic modules
    (``HF_HOME``, ``HF_MODULES_CACHE``) under ``tmp_path``, so ``trust_remote_code=True`` loads must run
    purely from the files a saved folder carries. Pass results back by printing them (JSON is easiest).

    Args:
        script: Python source; ``import sys`` and the package block are prepended.
        tmp_path: A scratch folder; the script runs with it as working directory.
        timeout: Seconds before the subprocess is killed.

    Returns:
        The script's stdout.

    Raises:
        RuntimeError: The script exited non-zero; the message holds its stderr.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGE + script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"Script failed with exit code {result.returncode}. stderr:\n{result.stderr}")
    return result.stdout


@pytest.fixture(name="run_without_package")
def run_without_package_fixture(tmp_path: Path) -> Callable[[str], str]:
    """``run_without_package(script) -> stdout``, bound to this test's ``tmp_path``."""

    def run(script: str) -> str:
        return run_without_package(script, tmp_path)

    return run


def _tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


@pytest.fixture
def tiny_backbone_config() -> BertConfig:
    """A fresh 2-layer, 32-wide BERT config whose vocabulary matches the ``tiny_backbone_dir`` tokenizer."""
    return _tiny_bert_config()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny random BERT (safetensors) and its WordPiece tokenizer, like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    if len(tokenizer) != len(TINY_VOCAB):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(TINY_VOCAB)}")
    torch.manual_seed(0)
    BertModel(_tiny_bert_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- a tiny entity tower

ENTITY_FIELDS = ["title", "description", "board_titles"]
ENTITY_CORPUS = ["Antique copper bathroom sink", "Copper kettle", "red summer dress", "北京 欢迎你", "ภาษาไทย", "مرحبا"]
# Inputs for the default tower of `make_entity_tower`: every field kind, a missing field, a per-image list.
SAMPLE_ENTITIES = [
    {"id": "p1", "title": "Antique copper sink", "description": "bathroom", "image_embedding": [1.0, 0.0, 2.0, 0.5]},
    {"title": "red dress", "board_titles": ["summer", "Dress ideas"]},
    {"description": "北京欢迎你", "image_embedding": [[1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 2.0]]},
    {"title": "", "description": "sink"},
]


def _build_tiny_entity_tower(
    corpus: list = ENTITY_CORPUS, *, dense: dict | None = None, seed: int = 0, oov_buckets: int = 3, **config
) -> OmniSearchSageEntityModel:
    """A randomly initialised entity tower (seeded) with an n-gram tokenizer built from ``corpus``.

    Unless overridden through ``config``: fields ``ENTITY_FIELDS``, one 4-dim dense feature ``image_embedding``
    (``dense`` replaces it), 97 buckets, 16-dim n-gram embeddings, hidden sizes [32, 32], 8-dim output.
    """
    torch.manual_seed(seed)
    tokenizer = build_vocab(corpus, oov_buckets=oov_buckets, show_progress_bar=False)
    config = OmniSearchSageEntityConfig(
        **{
            "vocab_size": tokenizer.vocab_size,
            "text_fields": ENTITY_FIELDS,
            "dense_features": {"image_embedding": 4} if dense is None else dense,
            "num_buckets": 97,
            "embedding_dim": 16,
            "hidden_dims": [32, 32],
            "out_dim": 8,
            **config,
        }
    )
    model = OmniSearchSageEntityModel(config)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="session")
def make_entity_tower() -> Callable[..., OmniSearchSageEntityModel]:
    """``make_entity_tower(corpus=ENTITY_CORPUS, *, dense=None, seed=0, oov_buckets=3, **config)``: a fresh tiny
    entity tower; its default shape reads ``sample_entities``."""
    return _build_tiny_entity_tower


@pytest.fixture(scope="module")
def sample_entities() -> list[dict]:
    """Four entities for the default ``make_entity_tower`` tower (a copy per test module)."""
    return copy.deepcopy(SAMPLE_ENTITIES)


# ---------------------------------------------------------------- a tiny BLIP captioner and images

CAPTION_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "a photo of red dress kitchen lamp wall art".split()


def _build_tiny_blip(folder: Path) -> Path:
    """Save a randomly initialised BLIP captioner and its processor to ``folder``, as a Hub model is laid out."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab" / "vocab.txt"
    vocab_file.write_text("\n".join(CAPTION_VOCAB) + "\n")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(vocab_file)),
    )
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = BlipConfig(
        text_config={
            **small,
            "vocab_size": len(CAPTION_VOCAB),
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


def _write_image(path: Path, seed: int) -> str:
    """Save a random RGB PNG of (24 + seed) x 40 pixels to ``path``; returns the path as a string."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24 + seed, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="session")
def build_tiny_blip() -> Callable[[Path], Path]:
    """``build_tiny_blip(folder) -> model folder``: a tiny random BLIP captioner saved under ``folder``."""
    return _build_tiny_blip


@pytest.fixture(scope="session")
def write_image() -> Callable[[Path, int], str]:
    """``write_image(path, seed) -> str(path)``: a random PNG whose size and pixels depend on ``seed``."""
    return _write_image
