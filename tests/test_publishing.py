"""Hub publishing with the HTTP API intercepted: exact commits, model cards and their metadata, usage snippets."""

import json
import re
import socket
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCardData

from omnisearchsage_hf import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from omnisearchsage_hf.evaluation import RecallEvaluator
from omnisearchsage_hf.publishing import CARD_KINDS, eval_results, model_card, publish, push_to_hub
from omnisearchsage_hf.training import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
QUERY_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "configuration_query.py",
    "modeling_query.py",
    "attached_tokenizer.py",
    "sentence_transformers_folder.py",
    "encoding.py",
    "saved_folder.py",
    "checksums.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "backbone/config.json",
    "backbone/model.safetensors",
    "backbone/sentence_bert_config.json",
    "backbone/tokenizer.json",
    "backbone/tokenizer_config.json",
    "1_Pooling/config.json",
    "2_Dense/config.json",
    "2_Dense/model.safetensors",
    "3_Normalize/config.json",
}
ENTITY_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "configuration_entity.py",
    "modeling_entity.py",
    "modeling_hash_embedding.py",
    "entity_inputs.py",
    "attached_tokenizer.py",
    "encoding.py",
    "saved_folder.py",
    "checksums.json",
    "tokenization_omnisearchsage.py",
    "ngrams.py",
    "tokenizer_config.json",
    "trigrams.txt",
    "unigrams.txt",
    "bigrams.txt",
}
TOKENIZER_FILES = {
    "README.md",
    "tokenization_omnisearchsage.py",
    "ngrams.py",
    "tokenizer_config.json",
    "trigrams.txt",
    "unigrams.txt",
    "bigrams.txt",
}


class FakeHub:
    """Stands in for the Hub's HTTP API: records each commit's files (read at commit time) and repo creations."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], {}
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.repos.append((repo_id, private))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            hub.commits[repo_id] = files
            return f"commit:{repo_id}"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def card(self, repo_id: str) -> tuple[dict, str]:
        """``(YAML metadata, Markdown body)`` of the README committed to ``repo_id``."""
        text = self.commits[repo_id]["README.md"].decode("utf-8")
        _, front, body = text.split("---\n", 2)
        return yaml.safe_load(front), body


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    return FakeHub(monkeypatch)


@pytest.fixture(scope="module")
def towers(tiny_backbone_dir, make_entity_tower):
    torch.manual_seed(6)
    query_tower = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=8, query_prefix="query: ")
    return query_tower, make_entity_tower(seed=7)


@pytest.fixture(scope="module")
def run_dir(towers, tmp_path_factory, sample_entities) -> Path:
    """A finished run's output_dir, as the Trainer exports it, with metrics from the real evaluator."""
    query_tower, entity_tower = towers
    output_dir = tmp_path_factory.mktemp("run")
    query_tower.save_pretrained(output_dir / "query_tower")
    entity_tower.save_pretrained(output_dir / "entity_tower")
    pins = {f"p{i}": entity for i, entity in enumerate(sample_entities)}
    pairs = [("copper sink", "p0"), ("red dress", "p1"), ("北京", "p2"), ("bathroom sink", "p3")]
    metrics = RecallEvaluator(pairs, pins, corpus_size=3, ks=[1, 10], name="query_pin")(
        query_tower.encode, entity_tower.encode
    )
    texts = {t: t for t in ["copper sink", "sink", "red dress", "dress", "lamp"]}
    query_pairs = [("copper sink", "sink"), ("red dress", "dress")]
    evaluator = RecallEvaluator(query_pairs, texts, corpus_size=4, ks=[1, 10], name="query_query")
    metrics.update(evaluator(query_tower.encode, query_tower.encode))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return output_dir


def test_push_query_tower_commits_exactly_its_files_and_card(towers, hub):
    assert push_to_hub(towers[0], "org/q", private=True) == "commit:org/q"
    assert hub.repos == [("org/q", True)]
    assert set(hub.commits["org/q"]) == QUERY_FILES
    metadata, body = hub.card("org/q")
    assert metadata["library_name"] == "sentence-transformers"
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert {"omnisearchsage", "sentence-transformers"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0" and metadata["language"] == ["multilingual"]
    assert "model-index" not in metadata
    assert "No evaluation results" in body and "| Task |" not in body
    assert 'SentenceTransformer("org/q")' in body and 'AutoModel.from_pretrained("org/q"' in body
    assert "$" not in body.replace("$$", "")  # every template placeholder was filled


def test_push_entity_tower_and_tokenizer(towers, hub):
    entity_tower = towers[1]
    push_to_hub(entity_tower, "org/e")
    push_to_hub(entity_tower.tokenizer, "org/t")
    assert set(hub.commits["org/e"]) == ENTITY_FILES
    assert set(hub.commits["org/t"]) == TOKENIZER_FILES
    metadata, body = hub.card("org/e")
    assert (metadata["library_name"], metadata["pipeline_tag"]) == ("transformers", "feature-extraction")
    assert "'image_embedding': [0.1] * 4" in body
    metadata, body = hub.card("org/t")
    assert "encode_bags" in body and "model-index" not in metadata


def test_publish_pushes_three_repos_whose_model_index_matches_the_evaluator(run_dir, hub):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = load_config(REPO_ROOT / "training" / "configs" / "tiny.yaml")
    commits = publish(run_dir, "org/oss", training_config=config, base_model="org/tiny-bert")
    assert set(commits) == {"org/oss-query", "org/oss-entity", "org/oss"}
    assert set(hub.commits["org/oss-query"]) == QUERY_FILES
    assert set(hub.commits["org/oss-entity"]) == ENTITY_FILES
    router_files = set(hub.commits["org/oss"])
    assert {f"query/{name}" for name in QUERY_FILES - {"README.md"}} <= router_files
    assert {f"document/{name}" for name in ENTITY_FILES - {"README.md"}} <= router_files
    assert {"README.md", "modules.json", "router_config.json", "entity_module.py"} <= router_files
    for repo_id in commits:
        metadata, body = hub.card(repo_id)
        [entry] = metadata["model-index"]
        assert all(result["dataset"]["name"] == result["dataset"]["config"] for result in entry["results"])
        published = {
            (result["dataset"]["name"], metric["type"]): metric["value"]
            for result in entry["results"]
            for metric in result["metrics"]
        }
        tasks, kinds = ("query_pin", "query_query"), ("recall_at_1", "recall_at_10", "mrr")
        assert set(published) == {(task, kind) for task in tasks for kind in kinds}
        for task in tasks:
            assert published[(task, "recall_at_1")] == metrics[f"{task}_recall@1"]
            assert published[(task, "recall_at_10")] == metrics[f"{task}_recall@10"]
            assert published[(task, "mrr")] == metrics[f"{task}_mrr"]
        assert metadata["language"] == ["en", "de", "ja"]  # the synthetic world's languages
        assert f"{metrics['query_pin_recall@1']:.4f}" in body
        assert "| query_pin | `entity:pin` | 8 | 32 |" in body  # the training tasks
        assert "500 random candidates" in body
    assert hub.card("org/oss-query")[0]["base_model"] == "org/tiny-bert"
    assert "base_model" not in hub.card("org/oss-entity")[0]
    assert "[org/oss-entity](https://huggingface.co/org/oss-entity)" in hub.card("org/oss-query")[1]


def test_publish_a_run_without_metrics_or_config_says_so(run_dir, tmp_path, hub):
    for name in ("query_tower", "entity_tower"):
        (tmp_path / name).symlink_to(run_dir / name)
    publish(tmp_path, "org/bare")
    metadata, body = hub.card("org/bare")
    assert "model-index" not in metadata
    assert "No evaluation results" in body and "was not recorded" in body
    with pytest.raises(FileNotFoundError, match="entity_tower"):
        publish(tmp_path / "query_tower", "org/x")


def test_publish_reads_the_config_the_trainer_recorded(run_dir, tmp_path, hub):
    for name in ("query_tower", "entity_tower", "metrics.json"):
        (tmp_path / name).symlink_to(run_dir / name)
    (tmp_path / "training_config.yaml").write_text((REPO_ROOT / "training" / "configs" / "tiny.yaml").read_text())
    publish(tmp_path, "org/recorded")
    body = hub.card("org/recorded")[1]
    assert "was not recorded" not in body and "| query_pin | `entity:pin` | 8 | 32 |" in body


# ---------------------------------------------------------------- publishing without the Hub


def _no_network(*args, **kwargs):
    raise AssertionError("publish(push=False) must not touch the network")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def offline(run_dir, tmp_path_factory) -> dict[str, Path]:
    """``publish(run_dir, "org/omni", push=False, ...)`` with every Hub client call and socket connection failing."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("create_repo", "create_commit", "upload_folder", "upload_file", "repo_info", "whoami"):
            patch.setattr(HfApi, name, _no_network)
        patch.setattr(socket.socket, "connect", _no_network)
        return publish(run_dir, "org/omni", push=False, local_dir=tmp_path_factory.mktemp("published"))


def test_publish_without_push_writes_exactly_what_a_push_commits(run_dir, offline, tmp_path, hub):
    names = {"org/omni-query": "omni-query", "org/omni-entity": "omni-entity", "org/omni": "omni"}
    assert {repo_id: folder.name for repo_id, folder in offline.items()} == names
    assert {p.name for p in offline["org/omni"].parent.iterdir()} == set(names.values())  # no .partial left
    commits = publish(run_dir, "org/omni", local_dir=tmp_path)  # the push path, its folders kept in tmp_path
    assert commits == {repo_id: f"commit:{repo_id}" for repo_id in names}
    assert set(_files(offline["org/omni-query"])) == QUERY_FILES
    for repo_id, folder in offline.items():
        assert _files(folder) == hub.commits[repo_id], repo_id  # same paths, same bytes, README.md included
        assert _files(tmp_path / names[repo_id]) == hub.commits[repo_id], repo_id


def test_published_folders_load_and_embed_like_the_run(towers, offline, sample_entities):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    query_tower, entity_tower = towers
    queries = ["copper sink", "red dress"]
    expected = query_tower.encode(queries)
    folder = str(offline["org/omni-query"])
    assert type(AutoModel.from_pretrained(folder)) is OmniSearchSageQueryModel  # the registered class
    np.testing.assert_allclose(AutoModel.from_pretrained(folder).encode(queries), expected, atol=1e-6)
    np.testing.assert_allclose(SentenceTransformer(folder).encode(queries), expected, atol=1e-6)
    # With this package imported, transformers resolves the registered class even with trust_remote_code=True.
    entity = AutoModel.from_pretrained(offline["org/omni-entity"], trust_remote_code=True)
    np.testing.assert_allclose(entity.encode(sample_entities), entity_tower.encode(sample_entities), atol=1e-6)
    model = SentenceTransformer(str(offline["org/omni"]), trust_remote_code=True)
    np.testing.assert_allclose(model.encode_query(queries), expected, atol=1e-6)
    documents = model.encode_document(sample_entities)
    np.testing.assert_allclose(documents, entity_tower.encode(sample_entities), atol=1e-6)


def test_a_failed_write_keeps_the_previous_folder(run_dir, tmp_path, monkeypatch):
    folders = publish(run_dir, "org/omni", push=False, local_dir=tmp_path)
    before = {repo_id: _files(folder) for repo_id, folder in folders.items()}

    def save_half(self, save_directory, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")
        raise OSError("No space left on device")

    monkeypatch.setattr(OmniSearchSageEntityModel, "save_pretrained", save_half)
    with pytest.raises(OSError, match="No space left"):
        publish(run_dir, "org/omni", push=False, local_dir=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"omni-query", "omni-entity", "omni"}  # no .partial, no .old
    for repo_id, folder in folders.items():
        assert _files(folder) == before[repo_id], repo_id


def test_publish_without_push_needs_local_dir(run_dir):
    with pytest.raises(ValueError, match="local_dir"):
        publish(run_dir, "org/omni", push=False)


def test_card_metric_keys_must_be_evaluator_metrics():
    results = eval_results({"a_mrr": 0.2, "a_b_recall@5": 0.5})  # sorted by key; the name keeps its group
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        ("a_b", "recall_at_5", 0.5),
        ("a", "mrr", 0.2),
    ]
    # Two tasks stay two model-index results (the Hub groups by dataset type and config, not name).
    data = ModelCardData(eval_results=results, model_name="m")
    assert [r["dataset"]["name"] for r in data.to_dict()["model-index"][0]["results"]] == ["a_b", "a"]
    with pytest.raises(ValueError, match="'accuracy'"):
        eval_results({"accuracy": 0.3})


def test_card_kind_must_match_the_object(towers):
    with pytest.raises(TypeError, match="OmniSearchSageEntityModel"):
        model_card("entity", towers[0], "org/x")


def test_templates_ship_inside_the_package():
    folder = resources.files("omnisearchsage_hf").joinpath("model_cards")
    assert {f"{kind}.md" for kind in CARD_KINDS} <= {entry.name for entry in folder.iterdir()}
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"model_cards/*.md"' in pyproject  # package data: the wheel carries them


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_usage_snippets_run_as_written(towers, tmp_path, capsys):
    from omnisearchsage_hf.publishing import save_query_document_model

    query_tower, entity_tower = towers
    folders = {"query": tmp_path / "q", "entity": tmp_path / "e", "tokenizer": tmp_path / "t"}
    query_tower.save_pretrained(folders["query"])
    entity_tower.save_pretrained(folders["entity"])
    entity_tower.tokenizer.save_pretrained(folders["tokenizer"])
    folders["query_document"] = save_query_document_model(query_tower, entity_tower, tmp_path / "qd")
    objects = {"query": query_tower, "entity": entity_tower, "tokenizer": entity_tower.tokenizer}
    objects["query_document"] = (query_tower, entity_tower)
    ran = 0
    for kind in CARD_KINDS:
        card = model_card(kind, objects[kind], str(folders[kind]))
        for block in _python_blocks(str(card)):
            if "bibtex" in block:
                continue
            exec(compile(block, f"<{kind} card>", "exec"), {})
            ran += 1
    assert ran == 5
    printed = capsys.readouterr().out
    assert "(2, 8)" in printed and "(1, 8)" in printed and "torch.Size([1, 1])" in printed


@pytest.mark.slow
def test_wheel_contains_the_card_templates(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("omnisearchsage_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"omnisearchsage_hf/model_cards/{kind}.md" for kind in CARD_KINDS} <= names
    assert "omnisearchsage_hf/py.typed" in names  # PEP 561: type checkers read the package's annotations
