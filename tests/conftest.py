"""Shared test helpers: a subprocess without this package, and a tiny pretrained-style text backbone."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

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
