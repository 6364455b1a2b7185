"""Checkpoints without pickle (resume exact, tampered and damaged folders refused by name), and reproducible runs.

The unit tests drive ``Checkpointer`` on a toy model; the run tests train ``tiny.yaml`` shrunk by overrides
through ``training/train.py``, as a user would.
"""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from omnisearchsage_hf.training.builders import build_towers, learn_wordpiece_vocab, train_wordpiece_tokenizer
from omnisearchsage_hf.training.checkpoints import Checkpointer, CheckpointError
from omnisearchsage_hf.training.config import load_config
from omnisearchsage_hf.training.frequency import EstimatorGroup, FrequencyEstimator
from omnisearchsage_hf.training.run_files import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "omnisearchsage_hf" / "training" / "configs" / "tiny.yaml"
CHECKPOINT_FILES = [
    "trainer_state.json",
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "training_state.safetensors",
    "rng_state_0.safetensors",
]


class _Payload:
    """Unpickling it creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data)  # the payload works: unpickling it writes the marker ...
    assert marker.exists()
    marker.unlink()  # ... which the tests then expect never to reappear
    return data


# ---- the Checkpointer on a toy model ----------------------------------------------------------------


class _Toy:
    """A model with dropout (so the RNG matters), AdamW, and a frequency sketch: what a run checkpoints."""

    def __init__(self, accelerator: Accelerator):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.estimators = EstimatorGroup(in_batch=FrequencyEstimator(width=64))
        self.checkpointer = Checkpointer(accelerator, self.model, self.optimizer, {"task": self.estimators})

    def steps(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            loss = self.model(inputs).square().mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            ids = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(step))
            self.estimators["in_batch"].update(ids)

    def draws(self) -> list[float]:
        """One draw from each generator a checkpoint restores."""
        return [torch.rand(1).item(), float(np.random.rand()), random.random()]


@pytest.fixture(name="accelerator", scope="module")
def accelerator_fixture() -> Accelerator:
    return Accelerator(cpu=True)


@pytest.fixture(name="saved")
def saved_fixture(tmp_path, accelerator) -> tuple[Path, _Toy]:
    """A toy run checkpointed after 3 steps, then trained 3 more: ``(checkpoint folder, the run)``."""
    toy = _Toy(accelerator)
    toy.steps(0, 3)
    folder = toy.checkpointer.save(tmp_path / "run", 3, keep=2)
    toy.steps(3, 6)
    return folder, toy


def test_resume_equals_uninterrupted(saved, accelerator):
    folder, uninterrupted = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHECKPOINT_FILES)
    expected_draws = uninterrupted.draws()

    resumed = _Toy(accelerator)
    torch.manual_seed(123)  # whatever ran before the resume drew from the generators
    np.random.seed(123)
    random.seed(123)
    assert resumed.checkpointer.load(folder) == 3
    resumed.steps(3, 6)
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    for name, tensor in uninterrupted.estimators.state_dict().items():
        assert torch.equal(resumed.estimators.state_dict()[name], tensor), name
    state, resumed_state = uninterrupted.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert resumed_state["param_groups"] == state["param_groups"]
    for index, values in state["state"].items():
        for key, value in values.items():
            assert torch.equal(resumed_state["state"][index][key], value), (index, key)
    assert resumed.draws() == expected_draws


def test_keeps_the_newest_checkpoints(tmp_path, accelerator):
    toy = _Toy(accelerator)
    for step in (10, 20, 30, 40):
        toy.checkpointer.save(tmp_path, step, keep=2)
    toy.checkpointer.save(tmp_path, 40, keep=2)  # the same step again replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_30", "step_40"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_file_replaced_by_a_pickle_payload_is_refused_unrun(saved, accelerator, tmp_path, name):
    folder, _ = saved
    marker = tmp_path / "payload_ran"
    (folder / name).write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match=f"Cannot resume from {folder / name}"):
        _Toy(accelerator).checkpointer.load(folder)
    assert not marker.exists()


def test_stray_pickle_files_are_ignored_unrun(saved, accelerator, tmp_path):
    folder, _ = saved
    marker = tmp_path / "payload_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt"):
        (folder / name).write_bytes(_payload(marker))
    assert _Toy(accelerator).checkpointer.load(folder) == 3
    assert not marker.exists()


def test_accelerate_checkpoint_is_refused_unrun(tmp_path, accelerator):
    folder, marker = tmp_path / "step_50", tmp_path / "payload_ran"
    folder.mkdir()
    payload = _payload(marker)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "model.safetensors"):
        (folder / name).write_bytes(payload)
    (folder / "step.json").write_text('{"step": 50}')
    with pytest.raises(CheckpointError, match=r"step_50 has no trainer_state.json.*never loaded.*--overwrite"):
        _Toy(accelerator).checkpointer.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", ["truncated", "header", "missing"])
def test_damaged_file_is_named(saved, accelerator, name, damage):
    folder, _ = saved
    path = folder / name
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(b"\xff" * 8 + data[8:])
    else:
        path.unlink()
    if (name, damage) == ("trainer_state.json", "missing"):
        message = f"{folder} has no trainer_state.json"
    else:
        message = f"(?s)Cannot resume from {path}: .*delete the checkpoint folder {folder} to resume from the one"
    with pytest.raises(CheckpointError, match=message):
        _Toy(accelerator).checkpointer.load(folder)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("trainer_state.json", {"num_processes": 2}, r"written by 2 process\(es\) but this run has 1"),
        ("trainer_state.json", {"format_version": 7}, r"`format_version` is 7"),
        ("trainer_state.json", {"step": "3"}, r"`step` is '3'"),
        ("optimizer.json", {"param_groups": []}, r"0 param groups, this run 1"),
    ],
)
def test_wrong_content_is_named(saved, accelerator, name, edit, message):
    folder, _ = saved
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=message):
        _Toy(accelerator).checkpointer.load(folder)


def test_state_of_another_model_is_named(saved, accelerator):
    folder, _ = saved
    other = _Toy(accelerator)
    other.model.append(torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors: .*Missing key"):
        other.checkpointer.load(folder)
    other = _Toy(accelerator)
    other.estimators["random"] = FrequencyEstimator(width=64)
    with pytest.raises(CheckpointError, match=r"training_state.safetensors: missing keys \['task.random.hash_a'"):
        other.checkpointer.load(folder)


# ---- sources of run-to-run differences ----------------------------------------------------------------


def test_wordpiece_vocabulary_is_deterministic():
    # Equal counts everywhere: every choice is a tie, broken by the pair, never by hash or insertion order.
    counts = {"cat": 2, "hat": 2, "bat": 2, "tab": 2, "ab": 2}
    vocab = learn_wordpiece_vocab(counts, 14, special_tokens=["[UNK]"])
    # ##at (count 6) first; then five pairs of count 2, in order: (##a, ##b) < (a, ##b) < (b, ##at) < ...
    assert vocab == ["[UNK]", "a", "b", "c", "h", "t", "##a", "##b", "##t", "##at", "##ab", "ab", "bat", "cat"]
    assert learn_wordpiece_vocab(dict(reversed(counts.items())), 14, special_tokens=["[UNK]"]) == vocab
    texts = ["Antique copper sink", "copper lamp", "kitchen sink, red!", "日本語 lamp"] * 5
    tokenizer = train_wordpiece_tokenizer(texts, 60)
    reordered = train_wordpiece_tokenizer(reversed(texts), 60)
    assert tokenizer.backend_tokenizer.to_str() == reordered.backend_tokenizer.to_str()
    assert tokenizer.tokenize("Copper kitchen") == ["copper", "kitchen"]


def test_build_towers_seeded_ignores_earlier_draws(tmp_path):
    from omnisearchsage_hf.training.builders import build_tokenizers

    config = load_config(TINY)
    texts = ["antique copper sink", "red summer dress", "kitchen lamp"] * 20
    build_tokenizers(config.model, tmp_path, entity_texts=texts, query_texts=texts)
    first = build_towers(config.model, tmp_path, seed=5)
    torch.rand(1000)  # e.g. a zero-shot encoder loaded to fill a cold cache
    second = build_towers(config.model, tmp_path, seed=5)
    for a, b in zip(first, second, strict=True):
        for name, tensor in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], tensor), name


# ---- real runs ----------------------------------------------------------------------------------------

# tiny.yaml shrunk: 6 steps on a small world, a checkpoint at step 3, no evaluation before the end.
_SMALL_RUN = {
    "data.synthetic.num_pins": 300,
    "data.synthetic.num_products": 100,
    "data.synthetic.num_queries": 200,
    "data.synthetic.num_query_pin_pairs": 1000,
    "data.synthetic.num_query_product_pairs": 400,
    "data.synthetic.num_query_query_pairs": 300,
    "train.max_steps": 6,
    "train.save_every": 3,
    "train.eval_every": 0,
    "train.log_every": 3,
}
EXPORTS = ("query_tower", "entity_tower", "tokenizers")


def _train(output_dir: Path, *flags: str, hash_seed: int = 0) -> subprocess.CompletedProcess:
    """``training/train.py`` on the shrunk tiny config; Python's string hashing salted by ``hash_seed``."""
    overrides = [arg for key, value in _SMALL_RUN.items() for arg in (f"--{key}", str(value))]
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(TINY)]
    command += ["--output_dir", str(output_dir), "--no-example", *overrides, *flags]
    env = {
        **os.environ,
        "PYTHONHASHSEED": str(hash_seed),
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_exports(expected: Path, actual: Path) -> None:
    """Every tensor of every safetensors file equal, every other file byte-identical."""
    files = sorted(p.relative_to(expected) for name in EXPORTS for p in (expected / name).rglob("*") if p.is_file())
    assert files and files == sorted(
        p.relative_to(actual) for name in EXPORTS for p in (actual / name).rglob("*") if p.is_file()
    )
    for file in sorted(files, key=lambda f: f.suffix != ".safetensors"):  # tensors first: the clearest message
        if file.suffix == ".safetensors":
            want, got = load_file(expected / file), load_file(actual / file)
            assert sorted(got) == sorted(want), file
            for key, tensor in want.items():
                assert torch.equal(got[key], tensor), f"{file}: {key}"
        else:
            assert (actual / file).read_bytes() == (expected / file).read_bytes(), file


@pytest.fixture(name="first_run", scope="module")
def first_run_fixture(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("first") / "run"
    result = _train(output_dir, hash_seed=1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return output_dir


def test_two_runs_with_the_same_seed_export_identical_towers(first_run, tmp_path):
    result = _train(tmp_path / "run", hash_seed=2)  # another process, another string-hash salt
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    _assert_same_exports(first_run, tmp_path / "run")


def test_resumed_run_exports_what_the_uninterrupted_run_did(first_run, tmp_path):
    resumed = tmp_path / "run"
    shutil.copytree(first_run, resumed)
    for name in ("query_tower", "entity_tower", "metrics.json"):  # as if killed after the step-3 checkpoint
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    assert latest_checkpoint(resumed).name == "step_3"
    result = _train(resumed, "--resume", hash_seed=3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Resumed from {resumed / 'checkpoints' / 'step_3'} at step 3" in result.stdout + result.stderr
    _assert_same_exports(first_run, resumed)


def test_resume_from_tampered_checkpoint_fails_naming_the_file_unrun(first_run, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "payload_ran"
    shutil.copytree(first_run, run)  # the prepared data too: only the checkpoint is under test
    (run / "checkpoints" / "step_3" / "rng_state_0.safetensors").write_bytes(_payload(marker))
    old_format = run / "checkpoints" / "step_4"  # newer, so --resume picks it first
    old_format.mkdir()
    (old_format / "custom_checkpoint_0.pkl").write_bytes(_payload(marker))
    (old_format / "random_states_0.pkl").write_bytes(_payload(marker))

    result = _train(run, "--resume")
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert f"{old_format} has no trainer_state.json" in result.stderr
    shutil.rmtree(old_format)
    result = _train(run, "--resume")
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert f"Cannot resume from {run / 'checkpoints' / 'step_3' / 'rng_state_0.safetensors'}" in result.stderr
    assert not marker.exists()
