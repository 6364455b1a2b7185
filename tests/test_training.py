"""Training: task mixing, config, schedule, and real runs of training/configs/tiny.yaml (2 processes, kill/resume)."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel, BertConfig, DistilBertConfig

from omnisearchsage_hf import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from omnisearchsage_hf.training.builders import transformer_blocks
from omnisearchsage_hf.training.config import load_config, parse_overrides
from omnisearchsage_hf.training.pairs import cap_pairs_per_candidate
from omnisearchsage_hf.training.run_files import latest_checkpoint
from omnisearchsage_hf.training.tasks import pair_indices, random_negative_indices, task_batch_sizes
from omnisearchsage_hf.training.trainer import learning_rate

ROOT = Path(__file__).parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"


class TestTaskMixing:
    def test_paper_shares(self):
        assert task_batch_sizes(16, {"pin": 8, "product": 4, "query": 2, "other": 2}) == {
            "pin": 8,
            "product": 4,
            "query": 2,
            "other": 2,
        }

    def test_every_task_gets_a_pair_and_sizes_add_up(self):
        sizes = task_batch_sizes(10, {"a": 100, "b": 1, "c": 1})
        assert sum(sizes.values()) == 10 and min(sizes.values()) >= 1 and sizes["a"] == 8

    @pytest.mark.parametrize(("batch", "shares"), [(1, {"a": 1, "b": 1}), (4, {"a": 1, "b": 0})])
    def test_bad_split(self, batch, shares):
        with pytest.raises(ValueError):
            task_batch_sizes(batch, shares)

    def test_pair_indices_deal_each_epoch_once_across_processes(self):
        # 2 processes x 3 steps x 5 pairs = 30 = 3 epochs of 10 pairs.
        seen = np.concatenate(
            [pair_indices(10, step=s, count=5, seed=3, rank=r, world_size=2) for s in range(3) for r in range(2)]
        )
        assert sorted(seen.tolist()) == sorted(list(range(10)) * 3)
        first_epoch = np.concatenate(
            [pair_indices(10, step=0, count=5, seed=3, rank=r, world_size=2) for r in range(2)]
        )
        assert sorted(first_epoch.tolist()) == list(range(10))

    def test_pair_indices_are_pure_and_reshuffle_each_epoch(self):
        a = pair_indices(7, step=4, count=3, seed=1)
        assert np.array_equal(a, pair_indices(7, step=4, count=3, seed=1))
        epochs = [
            np.concatenate([pair_indices(50, step=s, count=10, seed=0) for s in range(e * 5, e * 5 + 5)])
            for e in range(2)
        ]
        assert sorted(epochs[0]) == sorted(epochs[1]) and not np.array_equal(epochs[0], epochs[1])

    def test_task_with_few_pairs_cycles(self):
        assert len(pair_indices(2, step=100, count=5, seed=0)) == 5

    def test_random_negatives_seeded(self):
        a = random_negative_indices(100, count=8, seed=0, step=3, rank=0, task=1)
        assert np.array_equal(a, random_negative_indices(100, count=8, seed=0, step=3, rank=0, task=1))
        assert not np.array_equal(a, random_negative_indices(100, count=8, seed=0, step=3, rank=1, task=1))
        assert a.min() >= 0 and a.max() < 100

    def test_popularity_cap(self):
        candidates = np.array([0] * 120 + [1] * 3 + [2] * 60)
        kept = cap_pairs_per_candidate(candidates, 50, seed=0)
        assert np.bincount(candidates[kept]).tolist() == [50, 3, 50]
        assert np.array_equal(kept, cap_pairs_per_candidate(candidates, 50, seed=0))
        assert len(cap_pairs_per_candidate(candidates, None, seed=0)) == len(candidates)


class TestConfigAndSchedule:
    def test_tiny_config_loads_with_overrides(self):
        overrides = parse_overrides(["--train.max_steps", "5", "--loss.matryoshka_dims=[16, 64]", "--output_dir", "x"])
        config = load_config(TINY, overrides)
        assert config.train.max_steps == 5 and config.loss.matryoshka_dims == [16, 64] and config.output_dir == "x"
        assert [t.share for t in config.data.tasks] == [8, 4, 2, 1, 1]

    @pytest.mark.parametrize(
        ("overrides", "match"),
        [
            ({"train.max_step": 3}, r"Unknown key\(s\) \['max_step'\] in `train`"),
            ({"train.batch_size": 2}, "every one of the 5 tasks"),
            ({"data.tasks": [{"name": "a", "candidate": "pins"}]}, "'entity:<table>'"),
            ({"data.tasks": []}, "at least one task"),
        ],
    )
    def test_bad_config_names_the_key(self, overrides, match):
        with pytest.raises(ValueError, match=match):
            load_config(TINY, overrides)

    def test_learning_rate_warmup_then_cosine(self):
        rates = [learning_rate(s, base=1.0, warmup_steps=10, max_steps=110) for s in range(110)]
        assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
        assert rates[60] == pytest.approx(0.5, abs=0.02) and rates[-1] < 0.01
        assert all(a >= b for a, b in itertools.pairwise(rates[9:]))

    def test_latest_checkpoint_ignores_partial(self, tmp_path):
        for name in ("step_10", "step_30", "step_40.partial", "step_x"):
            (tmp_path / "checkpoints" / name).mkdir(parents=True)
        assert latest_checkpoint(tmp_path).name == "step_30"
        assert latest_checkpoint(tmp_path / "nothing") is None


def _logged(output: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r'(\{"step".*?\})\s*$', output.replace("\r", "\n"), flags=re.M)]


def _check_export(output_dir: Path) -> None:
    query = AutoModel.from_pretrained(output_dir / "query_tower")
    entity = AutoModel.from_pretrained(output_dir / "entity_tower")
    assert isinstance(query, OmniSearchSageQueryModel) and isinstance(entity, OmniSearchSageEntityModel)
    q = query.encode(["some query"])
    e = entity.encode([{"title": "some pin", "board_titles": ["a board"]}])
    assert q.shape == e.shape == (1, 64) and np.isfinite(q).all() and np.isfinite(e).all()


def _train_command(output_dir: Path, *overrides: str) -> list[str]:
    """``python training/train.py`` on the tiny config, as a user would run it, with overrides."""
    return [
        sys.executable,
        str(ROOT / "training" / "train.py"),
        "--config",
        str(TINY),
        "--output_dir",
        str(output_dir),
        *overrides,
    ]


def _env() -> dict:
    return {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def test_two_process_tiny_run(tmp_path):
    # `accelerate launch` run by this interpreter (PATH need not hold the environment's scripts), then train.py.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command = [*launch, *_train_command(tmp_path)[1:]]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Training with 2 process(es)" in output
    losses = [entry["loss"] for entry in _logged(output) if "loss" in entry]
    assert len(losses) == 10
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 5, losses
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # Held-out Recall@10 over a 500-candidate corpus: 0.02 would be chance.
    assert metrics["query_pin_recall@10"] > 0.1 and metrics["query_product_recall@10"] > 0.1
    assert (tmp_path / "logs" / "tensorboard").is_dir()  # tensorboard tracker
    _check_export(tmp_path)


def test_kill_and_resume(tmp_path):
    command = _train_command(tmp_path, "--train.max_steps", "60", "--train.save_every", "10", "--train.eval_every", "0")
    first = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path) is None or int(latest_checkpoint(tmp_path).name[5:]) < 20:
        assert first.poll() is None, "the first run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "query_tower").exists()
    killed_at = int(latest_checkpoint(tmp_path).name[5:])

    result = subprocess.run([*command, "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    resumed = re.search(r"Resumed from \S+ at step (\d+)", output)
    assert resumed and int(resumed.group(1)) >= killed_at
    assert [e["step"] for e in _logged(output) if "loss" in e][-1] == 60
    _check_export(tmp_path)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_pairs_from_any_format_with_cap(tmp_path, suffix):
    import pandas as pd
    import pyarrow as pa

    from omnisearchsage_hf.data.tables import EntityTable
    from omnisearchsage_hf.training.pairs import load_pairs

    frame = pd.DataFrame({"query": [f"q{i % 7}" for i in range(30)], "candidate_id": ["a"] * 25 + ["b"] * 5})
    path = tmp_path / f"pairs{suffix}"
    {
        ".parquet": lambda: frame.to_parquet(path),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".csv": lambda: frame.to_csv(path, index=False),
    }[suffix]()
    pairs = load_pairs(path, EntityTable(pa.table({"id": ["a", "b"]})), task="t", max_per_candidate=10, seed=0)
    assert np.bincount(pairs.candidates).tolist() == [10, 5]
    assert (
        len(set(pairs.query_ids.tolist())) == len(set(pairs.queries(np.arange(len(pairs))))) == len(pairs.query_texts)
    )
    with pytest.raises(ValueError, match="'b' in the pairs of task 't' .* is not in entity table"):
        load_pairs(path, EntityTable(pa.table({"id": ["a"]})), task="t", max_per_candidate=None, seed=0)


def test_bf16_with_gradient_accumulation(tmp_path):
    command = _train_command(
        tmp_path,
        "--train.max_steps",
        "6",
        "--train.mixed_precision",
        "bf16",
        "--train.gradient_accumulation_steps",
        "2",
        "--train.eval_every",
        "0",
        "--train.save_every",
        "0",
        "--train.log_every",
        "3",
    )
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    losses = [e["loss"] for e in _logged(result.stdout + result.stderr) if "loss" in e]
    assert len(losses) == 2 and all(np.isfinite(losses))
    _check_export(tmp_path)


@pytest.mark.parametrize(
    "backbone",
    [
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32),
        DistilBertConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=32),
    ],
)
def test_transformer_blocks_are_the_backbone_layer_stack(backbone):
    model = AutoModel.from_config(backbone)
    blocks = transformer_blocks(model)
    assert len(blocks) == 3 and blocks is (
        model.encoder.layer if hasattr(model, "encoder") else model.transformer.layer
    )
