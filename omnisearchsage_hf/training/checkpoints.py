"""Training checkpoints without pickle: what ``checkpoints/step_N`` holds, and how ``--resume`` reads it.

A checkpoint resumes a run exactly (the resumed run ends with the same weights as one that was never
stopped), and resuming from a folder that came from elsewhere cannot run code: every file is safetensors
or JSON, nothing is unpickled and ``torch.load`` is never called. A tampered or damaged file fails to load
with an error naming it; it never executes. The folder holds:

- ``trainer_state.json`` (main process): the format version, the step, the number of processes, and
  the fp16 gradient scaler's numbers when there is one. Read with ``json``.
- ``model.safetensors`` (main process): every parameter and buffer of the unwrapped model (both towers
  and the losses' logit scales). Loaded with ``safetensors`` into the model, every key required.
- ``optimizer.safetensors`` and ``optimizer.json`` (main process): the optimizer's per-parameter tensors
  as ``state.<index>.<name>`` (AdamW's step and moments), and its param groups (learning rates, betas,
  weight decay, ...) with any non-tensor state. Read with ``safetensors`` and ``json``, then handed to
  ``optimizer.load_state_dict``.
- ``training_state.safetensors`` (main process): the state of every stateful training object passed
  to :class:`Checkpointer` (the trainer passes each loss's frequency sketches), as ``<name>.<key>``.
- ``rng_state_<rank>.safetensors`` (each process its own): the torch CPU generator and every CUDA
  device's generator (their uint8 state tensors), numpy's and Python's Mersenne Twister keys as int64
  tensors, and their few scalars as JSON in the file's metadata. Dropout draws from these, so a resumed
  run only matches an uninterrupted one with them restored; they differ per process, hence one file each.

The other files are written once, by the main process, because they are equal on every process: DDP keeps
parameters and optimizer state in step, and the sketches are updated with ids gathered from all
processes. Every process reads them. A checkpoint is written to ``step_N.partial`` and renamed to
``step_N`` when complete, so ``--resume`` never sees half a checkpoint.

Folders written by versions that used ``accelerator.save_state`` (``custom_checkpoint_*.pkl``,
``random_states_*.pkl``, ``optimizer.bin``) are refused without reading them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from ..atomic import replace_atomically, write_text_atomically
from .run_files import checkpoint_dir, checkpoint_step

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
TRAINING_STATE_FILE = "training_state.safetensors"
T = TypeVar("T")


class Stateful(Protocol):
    """Training state that is not a model weight: tensors out, tensors in (frequency sketches, samplers)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed; the message names the file and what to do."""


def rng_state_file(rank: int) -> str:
    """``rng_state_<rank>.safetensors``: the random generators of process ``rank``."""
    return f"rng_state_{rank}.safetensors"


@dataclass
class Checkpointer:
    """Save and resume what a training run needs beyond its config: model, optimizer, training state, RNG.

    Collective: call :meth:`save` and :meth:`load` on every process at the same point of the loop.

    Args:
        accelerator: The run's accelerator (process rank and count, barriers, the fp16 gradient scaler).
        model: The prepared model (DDP-wrapped or not); its unwrapped ``state_dict`` is saved.
        optimizer: The prepared optimizer.
        stateful: ``{name: object}`` of other training state, e.g. ``{task: loss.estimators}``.

    Example:
        ::

            checkpointer = Checkpointer(accelerator, model, optimizer, {"query_pin": loss.estimators})
            checkpointer.save("runs/x", step=50, keep=2)           # runs/x/checkpoints/step_50
            start = checkpointer.load("runs/x/checkpoints/step_50")  # 50
    """

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stateful: Mapping[str, Stateful]

    def save(self, output_dir: str | os.PathLike, step: int, *, keep: int) -> Path:
        """Write ``output_dir/checkpoints/step_<step>`` and keep only the newest ``keep`` checkpoints.

        A checkpoint of the same step from an earlier attempt is replaced. Returns the folder.
        """
        accelerator = self.accelerator
        final = checkpoint_dir(output_dir, step)
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:
            if partial.exists():  # left by a save that was killed
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _save_rng_state(partial / rng_state_file(accelerator.process_index))
        if accelerator.is_main_process:
            self._save_shared(partial, step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            complete = sorted(
                (p for p in final.parent.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step
            )
            for old in complete[:-keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _save_shared(self, folder: Path, step: int) -> None:
        scaler = self.accelerator.scaler
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "num_processes": self.accelerator.num_processes,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
        }
        model = self.accelerator.unwrap_model(self.model)
        replace_atomically(folder / MODEL_FILE, lambda tmp: save_model(model, tmp))
        optimizer = self.optimizer.state_dict()
        tensors, plain = {}, {}
        for index, values in optimizer["state"].items():
            plain[str(index)] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
            tensors.update({f"state.{index}.{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
        _save_tensors(folder / OPTIMIZER_TENSORS, tensors)
        _write_json(folder / OPTIMIZER_FILE, {"param_groups": optimizer["param_groups"], "state": plain})
        training = {f"{name}.{k}": v for name, obj in self.stateful.items() for k, v in obj.state_dict().items()}
        _save_tensors(folder / TRAINING_STATE_FILE, training)
        _write_json(folder / STATE_FILE, state)  # last: its presence marks the format

    def load(self, folder: str | os.PathLike) -> int:
        """Restore everything :meth:`save` wrote into ``folder``; returns the step to continue from.

        Raises:
            CheckpointError: ``folder`` is not a checkpoint of this format (an older one included), was
                written by another number of processes, or a file in it is missing, unreadable or does
                not fit the model, optimizer or training state; the message names the file.
        """
        folder, accelerator = Path(folder), self.accelerator
        state = _read_trainer_state(folder)
        if state["num_processes"] != accelerator.num_processes:
            raise CheckpointError(
                f"{folder / STATE_FILE} was written by {state['num_processes']} process(es) but this run has "
                f"{accelerator.num_processes}: resume with --num_processes {state['num_processes']} (every "
                "process resumes its own data shard and random state), or start over with --overwrite."
            )
        model = accelerator.unwrap_model(self.model)
        _checked(folder / MODEL_FILE, lambda: load_model(model, str(folder / MODEL_FILE)))
        self._load_optimizer(folder)
        self._load_stateful(folder / TRAINING_STATE_FILE)
        if accelerator.scaler is not None and state.get("grad_scaler") is not None:
            _checked(folder / STATE_FILE, lambda: accelerator.scaler.load_state_dict(state["grad_scaler"]))
        _load_rng_state(folder / rng_state_file(accelerator.process_index))
        return state["step"]

    def _load_optimizer(self, folder: Path) -> None:
        path, tensor_path = folder / OPTIMIZER_FILE, folder / OPTIMIZER_TENSORS
        saved = _read_json(path)
        tensors, _ = _read_tensors(tensor_path)
        current = self.optimizer.param_groups
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
            raise _damaged(path, "it holds no `param_groups` list")
        if len(saved["param_groups"]) != len(current):
            raise _damaged(path, f"it has {len(saved['param_groups'])} param groups, this run {len(current)}")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, _, name = key.removeprefix("state.").partition(".")
            if not key.startswith("state.") or not index.isdigit() or not name:
                raise _damaged(tensor_path, f"unexpected tensor {key!r} (expected `state.<index>.<name>`)")
            state.setdefault(int(index), {})[name] = value
        for index, values in saved.get("state", {}).items():
            if not index.isdigit() or not isinstance(values, dict):
                raise _damaged(path, f"unexpected state entry {index!r}: {values!r}")
            state.setdefault(int(index), {}).update(values)
        # JSON has no tuples: give back the type the optimizer uses (AdamW's `betas`).
        groups = [
            {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
            for group, now in zip(saved["param_groups"], current, strict=True)
        ]
        _checked(path, lambda: self.optimizer.load_state_dict({"state": state, "param_groups": groups}))

    def _load_stateful(self, path: Path) -> None:
        tensors, _ = _read_tensors(path)
        expected = {f"{name}.{k}": (name, k) for name, obj in self.stateful.items() for k in obj.state_dict()}
        missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise _damaged(
                path, f"missing keys {missing}, unexpected keys {unexpected} (saved with other tasks or loss options?)"
            )
        for name, obj in self.stateful.items():
            part = {key: tensors[f"{name}.{key}"] for (owner, key) in expected.values() if owner == name}
            _checked(path, lambda obj=obj, part=part: obj.load_state_dict(part))


def _read_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        if not folder.is_dir():
            raise CheckpointError(f"No checkpoint folder at {folder}.")
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"{folder} has no {STATE_FILE}, so it is not a checkpoint this version can resume (it holds "
            f"{found[:8]}). Checkpoints of earlier versions (accelerate's save_state: custom_checkpoint_*.pkl, "
            "random_states_*.pkl) are never loaded, because unpickling a file can run code. Start the run over "
            "with --overwrite, or resume it with the version of omnisearchsage-hf that wrote it."
        )
    state = _read_json(path)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise _damaged(path, f"`format_version` is {version!r}, this version reads {FORMAT_VERSION}")
    for key in ("step", "num_processes"):
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) or state[key] < 0:
            raise _damaged(path, f"`{key}` is {state.get(key)!r}, expected a non-negative int")
    return state


def _save_rng_state(path: Path) -> None:
    """The generators of this process; numpy's and Python's states become int64 tensors plus JSON scalars."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),  # (5056,) uint8
        "numpy": torch.from_numpy(keys.astype(np.int64)),  # (624,): uint32 values
        "python": torch.tensor(python_state, dtype=torch.int64),  # (625,): uint32 values and the index
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (num_devices, state_size) uint8
    metadata = {
        "numpy": json.dumps([algorithm, position, has_gauss, cached_gaussian]),
        "python": json.dumps([version, gauss_next]),
    }
    _save_tensors(path, tensors, metadata)


def _load_rng_state(path: Path) -> None:
    tensors, metadata = _read_tensors(path)

    def restore() -> None:
        algorithm, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
        version, gauss_next = json.loads(metadata["python"])
        torch.set_rng_state(tensors["torch"])
        np.random.set_state(
            (algorithm, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
        )
        random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(tensors["cuda"].unbind(0)))

    _checked(path, restore)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # Through `replace_atomically` for the file mode it gives (the umask's), not for atomicity: the folder
    # is renamed into place as a whole.
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on CPU) and its metadata."""

    def read() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}

    return _checked(path, read)


def _read_json(path: Path) -> Any:
    return _checked(path, lambda: json.loads(path.read_text(encoding="utf-8")))


def _checked(path: Path, action: Callable[[], T]) -> T:
    """``action()``, which reads ``path`` or loads what it held; a failure becomes an error naming ``path``.

    Caught: unreadable files (missing, truncated, corrupt header or JSON) and content that does not fit
    this run (keys, shapes, sizes), which the loaders report as ``KeyError``/``RuntimeError``/``ValueError``.
    """
    try:
        return action()
    except (OSError, SafetensorError, UnicodeDecodeError, KeyError, RuntimeError, TypeError, ValueError) as error:
        raise _damaged(path, f"{type(error).__name__}: {error}") from error


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"Cannot resume from {path}: {problem}. The file is damaged, or the run was started with another config: "
        f"resume with that config (its training_config.yaml), delete the checkpoint folder {path.parent} to "
        "resume from the one before it, or start over with --overwrite."
    )


__all__ = ["Checkpointer", "CheckpointError", "Stateful", "rng_state_file"]
