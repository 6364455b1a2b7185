"""A new user's first hour, scripted: the README's first command, then what goes wrong next and how it is said.

Each step runs the installed command the way a user would (``omnisearchsage-train`` beside the interpreter,
from an empty working folder), on the bundled ``tiny`` config, and checks what the user sees.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel

import omnisearchsage_hf  # noqa: F401  (registers the towers with AutoModel)
from omnisearchsage_hf.serving.ann_index import build_entity_index
from omnisearchsage_hf.training.command import bundled_configs
from omnisearchsage_hf.training.run_files import latest_checkpoint

TRAIN = Path(sys.executable).parent / "omnisearchsage-train"
SHORT = ["--train.max_steps", "20", "--train.save_every", "10", "--train.eval_every", "0", "--train.log_every", "10"]


def train(cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [str(TRAIN), "--config", "tiny", "--output_dir", "runs/first-hour", *SHORT, *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The README's first command (shortened to 20 steps), from an empty folder."""
    if not TRAIN.is_file():
        pytest.fail(f"{TRAIN} is missing: install the package (`pip install -e .`) to get its commands.")
    cwd = tmp_path_factory.mktemp("first_hour")
    return cwd, train(cwd)


def test_the_first_command_trains_and_queries_the_exported_towers(first_run):
    cwd, result = first_run
    assert result.returncode == 0, result.stderr
    run = cwd / "runs" / "first-hour"
    assert AutoModel.from_pretrained(run / "query_tower").config.model_type == "omnisearchsage_query"
    assert AutoModel.from_pretrained(run / "entity_tower").config.model_type == "omnisearchsage_entity"
    # The example query: a held-out query, the towers loaded back from disk, and where its engaged pin ranks.
    assert re.search(r"Example: the held-out query .* of task 'query_pin', against \d+ pin entities", result.stdout)
    assert re.search(r"The engaged entity 'pin_\d+' ranks \d+ of \d+\.", result.stdout)
    # Metrics are lines of their own, not glued onto the progress bar.
    assert any(line.startswith('{"step": 20, "query_pin_recall@1"') for line in result.stdout.splitlines())
    assert (run / "logs").is_dir() and not (run / "omnisearchsage").exists()


def test_training_again_into_the_same_folder_says_what_to_do_then_resumes(first_run):
    cwd, _ = first_run
    again = train(cwd)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert "Traceback" not in again.stderr and len(lines) == 2, again.stderr
    assert "already holds a training run" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    run = cwd / "runs" / "first-hour"
    # A save killed half-way leaves a .partial folder: it is cleared, never fatal.
    (run / "checkpoints" / "step_30.partial").mkdir(parents=True)
    resumed = train(cwd, "--resume", "--train.max_steps", "30", "--no-example")
    assert resumed.returncode == 0, resumed.stderr
    # Checkpoints every 10 steps before the last: the first run left step_10, the resumed one adds step_20.
    assert re.search(r"Resumed from \S*step_10 at step 10", resumed.stdout), resumed.stdout[:500]
    assert latest_checkpoint(run).name == "step_20" and not (run / "checkpoints" / "step_30.partial").exists()
    assert '{"step": 30, "query_pin_recall@1"' in resumed.stdout


def test_overwrite_starts_over_and_keeps_the_prepared_data(first_run):
    cwd, _ = first_run
    run = cwd / "runs" / "first-hour"
    world = (run / "data" / "world.json").stat().st_mtime_ns
    fresh = train(cwd, "--overwrite", "--train.max_steps", "10", "--no-example")
    assert fresh.returncode == 0, fresh.stderr
    assert "Removed from runs/first-hour: checkpoints" in fresh.stdout and "Resumed" not in fresh.stdout
    assert (run / "data" / "world.json").stat().st_mtime_ns == world  # the generated world was reused


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    typo = subprocess.run(
        [str(TRAIN), "--config", "tiny", "--output_dir", str(tmp_path / "x"), "--train.max_stepz", "5"],
        capture_output=True,
        text=True,
    )
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "Unknown key(s) ['max_stepz'] in `train`" in typo.stderr
    unknown = subprocess.run([str(TRAIN), "--config", "tinny", "--debug"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "Traceback" in unknown.stderr and "bundled: [" in unknown.stderr


def test_help_lists_every_config_key_and_the_bundled_configs():
    shown = subprocess.run([str(TRAIN), "--help"], capture_output=True, text=True, check=True).stdout
    for key in ("--data.tasks", "--model.backbone", "--loss.logq_correction", "--train.max_steps", "--eval.ks"):
        assert key in shown, key
    assert "``" not in shown
    assert {"tiny", "xquad_r", "amazon_pqa", "itemsage"} <= set(bundled_configs())
    assert all(name in shown for name in bundled_configs())


def command(name: str) -> str:
    """An installed console script of this package, beside the interpreter (no PATH lookup)."""
    return str(Path(sys.executable).parent / name)


def test_the_run_embeds_on_two_cpu_processes_and_serves_only_a_matching_index(first_run, tmp_path):
    cwd, _ = first_run
    run = cwd / "runs" / "first-hour"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m"]
    embed = ["omnisearchsage_hf.serving.cli", "embed", "--entity-model", str(run / "entity_tower"), "--quiet"]
    embed += ["--table", str(run / "data" / "pins.parquet"), "--entity-type", "pin", "--chunk-size", "1000"]
    done = subprocess.run([*launch, *embed, "--out", str(tmp_path / "pins")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "pins" / "processes").glob("*.json")}
    assert set(records) == {"0.json", "1.json"}  # two processes, each with its own share of the 3 chunks
    # A query tower is not an entity model: refused before any work, in one line.
    wrong = subprocess.run(
        [command("omnisearchsage-embed"), "--entity-model", str(run / "query_tower"), "--table", "x.parquet",
         "--entity-type", "pin", "--out", str(tmp_path / "wrong")], capture_output=True, text=True,
    )  # fmt: skip
    assert wrong.returncode == 2 and "needs an entity tower or ItemSage folder" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    # An index of another width: the service refuses to start, naming both folders and both widths.
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_entity_index({"pin": ([f"p{i}" for i in range(50)], vectors)}, recall_queries=0).save(tmp_path / "idx32")
    serve = [command("omnisearchsage-serve"), "--query-model", str(run / "query_tower"), "--index"]
    refused = subprocess.run([*serve, str(tmp_path / "idx32")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "embeds queries in 64 dimensions" in refused.stderr and "holds 32-dimensional" in refused.stderr


def test_the_run_publishes_offline_and_its_folders_load(first_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    from omnisearchsage_hf.publishing import publish

    cwd, _ = first_run
    run = cwd / "runs" / "first-hour"
    folders = publish(run, "org/first-hour", push=False, local_dir=tmp_path / "published")
    assert sorted(path.name for path in folders.values()) == ["first-hour", "first-hour-entity", "first-hour-query"]
    query = "a held-out query"
    trained = AutoModel.from_pretrained(run / "query_tower").encode(query)
    assert np.allclose(AutoModel.from_pretrained(tmp_path / "published" / "first-hour-query").encode(query), trained)
    assert np.allclose(SentenceTransformer(str(tmp_path / "published" / "first-hour-query")).encode(query), trained)
    assert "## Evaluation" in (tmp_path / "published" / "first-hour-query" / "README.md").read_text()
    combined = SentenceTransformer(str(tmp_path / "published" / "first-hour"), trust_remote_code=True)
    assert np.allclose(combined.encode_query(query), trained, atol=1e-6)
