"""sentence-transformers from the saved folders: the query tower alone, and both towers behind a Router."""

import json
import os

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from sentence_transformers import SentenceTransformer

from omnisearchsage_hf import OmniSearchSageQueryModel
from omnisearchsage_hf.publishing import save_query_document_model

QUERIES = ["antique copper bathroom sink", "lamp", "red summer dress shoes wall art kitchen " * 6, "日本語", ""]
ATOL = 1e-5


@pytest.fixture(params=[("cls", "query: "), ("mean", "")], ids=["cls-prefix", "mean-noprefix"])
def query_tower(request, tiny_backbone_dir) -> OmniSearchSageQueryModel:
    pooling, prefix = request.param
    torch.manual_seed(3)
    tower = OmniSearchSageQueryModel.from_backbone(
        tiny_backbone_dir, out_dim=8, pooling=pooling, query_prefix=prefix, max_length=12
    )
    with torch.no_grad():  # a non-trivial projection bias, so a dropped bias would show
        tower.projection.bias.normal_()
    return tower


def test_sentence_transformer_loads_the_query_tower_folder_with_builtin_modules(query_tower, tmp_path):
    query_tower.save_pretrained(tmp_path)
    model = SentenceTransformer(str(tmp_path))  # no trust_remote_code
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert all(type(m).__module__.startswith("sentence_transformers.") for m in model)
    assert model[1].pooling_mode == query_tower.config.pooling
    assert model.max_seq_length == query_tower.config.max_length
    expected = query_tower.encode(QUERIES)
    for embeddings in (model.encode(QUERIES), model.encode_query(QUERIES), model.encode_document(QUERIES)):
        assert embeddings.shape == expected.shape
        np.testing.assert_allclose(embeddings, expected, atol=ATOL)


def test_query_prefix_is_the_default_prompt(query_tower, tmp_path):
    query_tower.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    prefix = query_tower.config.query_prefix
    assert config["prompts"] == {"query": prefix, "document": prefix}
    assert config["default_prompt_name"] == ("query" if prefix else None)


def test_sentence_transformers_weights_equal_the_towers(query_tower, tmp_path):
    # backbone/ is a plain checkpoint of the backbone's own class (a copy: Hub repos forbid "../" file paths).
    query_tower.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        tower = {k: handle.get_tensor(k) for k in handle.keys()}
    with safe_open(tmp_path / "backbone" / "model.safetensors", "pt") as handle:
        backbone = {k: handle.get_tensor(k) for k in handle.keys()}
    with safe_open(tmp_path / "2_Dense" / "model.safetensors", "pt") as handle:
        dense = {k: handle.get_tensor(k) for k in handle.keys()}
    assert {f"backbone.{k}" for k in backbone} == {k for k in tower if k.startswith("backbone.")}
    for name, tensor in backbone.items():
        assert torch.equal(tensor, tower[f"backbone.{name}"]), name
    assert dense.keys() == {"linear.weight", "linear.bias"}
    assert torch.equal(dense["linear.weight"], tower["projection.weight"])
    assert torch.equal(dense["linear.bias"], tower["projection.bias"])


def test_save_pretrained_push_to_hub_commits_the_whole_folder_at_once(query_tower, tmp_path, monkeypatch):
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Url", (), {"repo_id": repo_id}))
    monkeypatch.setattr(
        HfApi, "create_commit", lambda self, repo_id, operations, **kwargs: commits.append((repo_id, operations))
    )
    query_tower.save_pretrained(tmp_path / "omnisearchsage-query", push_to_hub=True, repo_id="org/q")
    [(repo_id, operations)] = commits
    pushed = {op.path_in_repo for op in operations}
    saved = {p.relative_to(tmp_path / "omnisearchsage-query").as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert repo_id == "org/q" and pushed == saved
    assert {"modules.json", "backbone/model.safetensors", "tokenizer_config.json"} <= pushed


# ---------------------------------------------------------------- without this package; the Router


@pytest.fixture(scope="module")
def towers(tiny_backbone_dir, make_entity_tower):
    torch.manual_seed(4)
    query_tower = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=8, query_prefix="query: ")
    return query_tower, make_entity_tower(seed=5)


@pytest.fixture(scope="module")
def router_dir(towers, tmp_path_factory):
    return save_query_document_model(*towers, tmp_path_factory.mktemp("router") / "model")


def test_sentence_transformer_and_auto_model_without_the_package(towers, tmp_path, run_without_package):
    query_tower = towers[0]
    folder = tmp_path / "tower"
    query_tower.save_pretrained(folder)
    stdout = run_without_package(
        f"""
import json
from sentence_transformers import SentenceTransformer
from transformers import AutoModel
st = SentenceTransformer({str(folder)!r}).encode({QUERIES!r})
hf = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).encode({QUERIES!r})
print(json.dumps({{"st": st.tolist(), "hf": hf.tolist()}}))
"""
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    expected = query_tower.encode(QUERIES)
    np.testing.assert_allclose(np.array(result["st"]), expected, atol=ATOL)
    np.testing.assert_allclose(np.array(result["hf"]), expected, atol=ATOL)


def test_encode_query_and_encode_document_go_through_the_router(towers, router_dir, sample_entities):
    query_tower, entity_tower = towers
    model = SentenceTransformer(str(router_dir), trust_remote_code=True)
    assert type(model[0]).__name__ == "Router"
    queries = model.encode_query(QUERIES)
    documents = model.encode_document(sample_entities)
    np.testing.assert_allclose(queries, query_tower.encode(QUERIES), atol=ATOL)
    np.testing.assert_allclose(documents, entity_tower.encode(sample_entities), atol=ATOL)
    scores = model.similarity(queries, documents)
    np.testing.assert_allclose(scores.numpy(), queries @ documents.T, atol=ATOL)
    # The document route is the default; the query route with an explicit task equals encode_query.
    np.testing.assert_allclose(model.encode(sample_entities, task="document"), documents, atol=ATOL)


def test_router_folder_keeps_each_tower_loadable(towers, router_dir):
    query_tower, entity_tower = towers
    reloaded = OmniSearchSageQueryModel.from_pretrained(router_dir / "query")
    np.testing.assert_array_equal(reloaded.encode(QUERIES), query_tower.encode(QUERIES))
    assert not list(router_dir.glob("query_*")), "the query route reads query/, it must not copy the backbone"


def test_router_needs_trust_remote_code(router_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(router_dir))


def test_entities_take_no_prompt(router_dir, sample_entities):
    model = SentenceTransformer(str(router_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match="Entities take no prompt"):
        model.encode_document(sample_entities, prompt="query: ")


def test_towers_must_share_out_dim(towers, tmp_path, make_entity_tower):
    with pytest.raises(ValueError, match="out_dim"):
        save_query_document_model(towers[0], make_entity_tower(out_dim=4), tmp_path)


# ---------------------------------------------------------------- published folders, in a fresh environment

_FRESH_ENV_SCRIPT = """
import json, sys
try:
    import omnisearchsage_hf
    raise SystemExit("omnisearchsage_hf must not be importable in the fresh environment")
except ImportError:
    pass
import sentence_transformers, transformers
from sentence_transformers import SentenceTransformer
from transformers import AutoModel
queries, entities, folder, router, repo_id = json.loads(sys.argv[1])
result = {"versions": [transformers.__version__, sentence_transformers.__version__]}
result["st"] = SentenceTransformer(folder).encode(queries).tolist()
result["hf"] = AutoModel.from_pretrained(folder, trust_remote_code=True).encode(queries).tolist()
# The same folder as a Hub repository in the local cache (the Hub's file-name rules apply there).
result["st_hub"] = SentenceTransformer(repo_id).encode(queries).tolist()
result["hf_hub"] = AutoModel.from_pretrained(repo_id, trust_remote_code=True).encode(queries).tolist()
model = SentenceTransformer(router, trust_remote_code=True)
result["query"] = model.encode_query(queries).tolist()
result["document"] = model.encode_document(entities).tolist()
print(json.dumps(result))
"""


@pytest.mark.slow
def test_published_folders_load_in_a_fresh_environment_without_this_package(
    towers, router_dir, tmp_path, sample_entities
):
    """save → a new virtual environment with only torch, transformers and sentence-transformers → load and embed."""
    import shutil
    import subprocess
    import sys

    query_tower, entity_tower = towers
    folder = tmp_path / "query_tower"
    query_tower.save_pretrained(folder)
    # A Hub snapshot as huggingface_hub caches it, read offline by repo id.
    revision = "0" * 40
    cache = tmp_path / "hf_home" / "hub" / "models--org--omnisearchsage-query"
    shutil.copytree(folder, cache / "snapshots" / revision)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(revision)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    packages = ["torch==2.13.0", "transformers", "sentence-transformers"]
    subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True, timeout=1200)
    arguments = json.dumps([QUERIES, sample_entities, str(folder), str(router_dir), "org/omnisearchsage-query"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [python, "-c", _FRESH_ENV_SCRIPT, arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print("fresh environment: transformers {}, sentence-transformers {}".format(*tuple(result["versions"])))
    for key in ("st", "hf", "st_hub", "hf_hub"):
        np.testing.assert_allclose(np.array(result[key]), query_tower.encode(QUERIES), atol=ATOL, err_msg=key)
    np.testing.assert_allclose(np.array(result["query"]), towers[0].encode(QUERIES), atol=ATOL)
    np.testing.assert_allclose(np.array(result["document"]), entity_tower.encode(sample_entities), atol=ATOL)
