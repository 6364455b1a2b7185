"""Encode queries with a saved query tower on PyTorch, ONNX Runtime or OpenVINO, through one ``encode()``.

``load_query_encoder(folder, backend)`` returns an object whose ``encode`` has the signature and the
semantics of ``OmniSearchSageQueryModel.encode``: the same query prefix, surrogate handling, truncation to
``max_length`` tokens, length-sorted batches, pooling, projection and L2 normalisation, Matryoshka
``truncate_dim``, and return types. With ``backend="torch"`` it is the tower itself; with ``"onnx"`` or
``"openvino"`` the backbone runs from an export (``export.py``) and pooling, projection and normalisation
run in torch with the tower's own ``pool`` function and the projection of ``2_Dense/model.safetensors``:
they are a few microseconds per query, and so stay exactly the tower's.

Every file read is checked against the folder's ``checksums.json`` first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..modeling import OmniSearchSageQueryConfig, OmniSearchSageQueryModel
from ..modeling.encoding import check_queries, encode_in_batches, tokenize_queries
from ..modeling.modeling_query import pool
from ..modeling.saved_folder import check_config_file, local_resolver, read_checksums
from .export_files import (
    RUNTIMES,
    Backend,
    check_backend,
    check_recorded,
    export_command,
    export_members,
    export_name,
    exported_files,
    import_runtime,
)

PROJECTION_FILE = "2_Dense/model.safetensors"
# Runs the exported backbone: int64 token arrays by input name -> (bs, seq_len, hidden) float32 token states.
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class QueryEncoder:
    """A query tower whose backbone runs on ONNX Runtime or OpenVINO: ``encode`` as the PyTorch tower's.

    Build it with :func:`load_query_encoder`. The runtime runs on CPU; ``encode`` may be called from
    several threads (an OpenVINO call holds a lock, ONNX Runtime sessions are thread-safe).

    Args:
        config: The tower's configuration (prefix, ``max_length``, pooling, ``out_dim``).
        tokenizer: The tower's tokenizer.
        run: The exported backbone (see ``Runner``).
        input_names: The inputs ``run`` takes, in the export's order.
        projection: ``(weight (out_dim, hidden), bias (out_dim,))`` of the tower's projection.
        description: What runs the backbone, e.g. ``"onnx backbone/onnx/model.onnx"``.
    """

    def __init__(
        self,
        config: OmniSearchSageQueryConfig,
        tokenizer: PreTrainedTokenizerBase,
        run: Runner,
        input_names: list[str],
        projection: tuple[torch.Tensor, torch.Tensor],
        description: str,
    ):
        unknown = sorted(set(input_names) - {"input_ids", "attention_mask", "token_type_ids"})
        if unknown or "input_ids" not in input_names:
            raise ValueError(f"{description} takes inputs {input_names}: not a query tower backbone export.")
        self.config = config
        self.tokenizer = tokenizer
        self.run = run
        self.input_names = input_names
        self.weight, self.bias = projection
        self.description = description

    def __repr__(self) -> str:
        return f"QueryEncoder({self.description}, out_dim={self.config.out_dim}, pooling={self.config.pooling!r})"

    def encode(
        self,
        queries: str | list[str],
        *,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        device: str | torch.device | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed raw query strings; arguments, return value and errors as ``OmniSearchSageQueryModel.encode``.

        ``device`` must be None or ``"cpu"``: the exported backbone runs on the CPU.

        Example:
            ```python
            encoder = load_query_encoder("runs/x/query_tower", "onnx", file_name="model_qint8_quantized.onnx")
            print(encoder.encode(["antique copper bathroom sink", "lámpara de techo"]).shape)
            # (2, 256)
            ```
        """
        queries, single = check_queries(queries, self.config.out_dim, truncate_dim)
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"`device` must be None or 'cpu' for {self.description}, got {device!r}.")
        embeddings = encode_in_batches(
            queries,
            self._embed_batch,
            lengths=[len(query) for query in queries],
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor,
            normalize_embeddings=normalize_embeddings,
            truncate_dim=truncate_dim,
            desc="Encoding queries",
        )
        return embeddings[0] if single else embeddings

    def _embed_batch(self, batch: list[str]) -> torch.Tensor:
        """``(len(batch), out_dim)`` unit vectors, tokenised as ``OmniSearchSageQueryModel.tokenize`` does."""
        features = tokenize_queries(
            self.tokenizer,
            batch,
            prefix=self.config.query_prefix,
            max_length=self.config.max_length,
            return_tensors="np",
        )
        input_ids = features["input_ids"].astype(np.int64)  # (bs, seq_len)
        inputs = {
            # BERT reads absent token types as zeros; an export of such a backbone may still take them.
            name: features[name].astype(np.int64) if name in features else np.zeros_like(input_ids)
            for name in self.input_names
        }
        hidden = torch.from_numpy(self.run(inputs))  # (bs, seq_len, hidden)
        mask = torch.from_numpy(features["attention_mask"])  # (bs, seq_len)
        pooled = pool(hidden, mask, self.config.pooling)  # (bs, hidden)
        return F.normalize(F.linear(pooled, self.weight, self.bias), p=2, dim=-1)  # (bs, out_dim)


def load_query_encoder(
    folder: str | os.PathLike,
    backend: Backend = "torch",
    *,
    file_name: str | None = None,
    num_threads: int | None = None,
) -> OmniSearchSageQueryModel | QueryEncoder:
    """The query tower saved in ``folder``, running on ``backend``; call ``.encode(queries)`` on it.

    Args:
        folder: A local folder written by ``OmniSearchSageQueryModel.save_pretrained``.
        backend: ``"torch"`` (default: the tower itself, ``from_pretrained``), ``"onnx"`` or ``"openvino"``
            (an export written by :func:`~omnisearchsage_hf.backends.export_query_tower`).
        file_name: The export to run, a name in ``backbone/<backend>/`` such as ``"model_qint8_quantized.onnx"``
            or ``"openvino_model_qint8_quantized.xml"``; None (default) runs the float32 export.
            Not used by ``"torch"``.
        num_threads: Threads of the ONNX Runtime session or the OpenVINO model (None: the runtime's default,
            one per core). PyTorch's thread count is process-wide: set it with ``torch.set_num_threads``.

    Raises:
        ValueError: An unknown ``backend``, a ``file_name`` for ``"torch"``, or a file that does not match
            the folder's ``checksums.json``.
        FileNotFoundError: The export is missing (the message gives the command that writes it).
        ImportError: The runtime is not installed (the message names the extra to install).
    """
    check_backend(backend)
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)):
        raise ValueError(f"`num_threads` must be None or an int >= 1, got {num_threads!r}.")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"`num_threads` must be None or an int >= 1, got {num_threads!r}.")
    if backend == "torch":
        if file_name is not None:
            raise ValueError(f"`file_name` selects an ONNX or OpenVINO export; the torch backend got {file_name!r}.")
        return OmniSearchSageQueryModel.from_pretrained(folder)
    folder = Path(folder)
    file_name = file_name if file_name is not None else export_name(backend)
    members = export_members(backend, file_name)
    missing = [member for member in members if not (folder / member).is_file()]
    if missing:
        found = [name for name in exported_files(folder) if name.endswith((".onnx", ".xml"))]
        raise FileNotFoundError(
            f"{os.fspath(folder / missing[0])!r} is missing (exports found: {found or 'none'}). Write it with: "
            f"{export_command(folder, backend, file_name)}"
        )
    runtime = import_runtime(RUNTIMES[backend], backend)
    check_config_file(OmniSearchSageQueryConfig, folder / "config.json")
    recorded = read_checksums(local_resolver(folder), os.fspath(folder)) or {}
    top_level = [name for name in recorded if "/" not in name and not name.startswith("model.safetensors")]
    check_recorded(folder, sorted({"config.json", *top_level, PROJECTION_FILE, *members}))

    config = OmniSearchSageQueryConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tensors = load_file(folder / PROJECTION_FILE)
    projection = (tensors["linear.weight"], tensors["linear.bias"])
    opener = _onnx_runner if backend == "onnx" else _openvino_runner
    run, input_names = opener(runtime, folder / members[0], num_threads)
    return QueryEncoder(config, tokenizer, run, input_names, projection, f"{backend} {members[0]}")


def _onnx_runner(ort, path: Path, num_threads: int | None) -> tuple[Runner, list[str]]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or 0  # 0: one per physical core
    options.inter_op_num_threads = 1  # the graph is one chain of layers: nothing to run side by side
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([output], inputs)[0]

    return run, [node.name for node in session.get_inputs()]


def _openvino_runner(openvino, path: Path, num_threads: int | None) -> tuple[Runner, list[str]]:
    # f32 explicitly: on CPUs with bf16 or AMX, OpenVINO would otherwise run the float layers in bfloat16.
    properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if num_threads is not None:
        properties["INFERENCE_NUM_THREADS"] = num_threads
    compiled = openvino.Core().compile_model(str(path), "CPU", properties)
    request, lock, output = compiled.create_infer_request(), threading.Lock(), compiled.output(0)

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with lock:  # one infer request, whose output buffer the next call reuses: copy it out under the lock
            return request.infer(inputs)[output].copy()

    return run, [node.get_any_name() for node in compiled.inputs]


__all__ = ["QueryEncoder", "load_query_encoder"]
