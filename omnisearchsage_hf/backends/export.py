"""Export a saved query tower's backbone to ONNX or OpenVINO, in float32 or int8, inside the tower's folder.

What is exported is the backbone alone (token ids -> ``last_hidden_state``), as sentence-transformers and
Optimum export it, because the tower's saved folder is a sentence-transformers model whose ``Transformer``
module lives in ``backbone/``: ``SentenceTransformer(folder, backend="onnx", model_kwargs={"file_name":
"model_qint8_quantized.onnx"})`` runs the exported backbone and its own ``Pooling`` / ``Dense`` /
``Normalize`` modules, and :func:`~omnisearchsage_hf.backends.load_query_encoder` does the same pooling,
projection and normalisation in torch. Where the files go: ``export_files.py``.

Why these tools, not ``sentence_transformers.backend.export_*`` or Optimum: sentence-transformers' ONNX and
OpenVINO backends load and quantize through ``optimum.onnxruntime`` / ``optimum.intel``, and neither
installs beside transformers 5 (optimum-onnx 0.1.0 requires transformers < 4.58, optimum-intel 2.2.0 < 5.6).
So each step uses the runtime's own maintained tool, the ones Optimum itself wraps:

- ``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence axes (opset 20, native
  ``LayerNormalization`` and ``Gelu``); on multilingual-e5-small it matches PyTorch within 1.2e-6 and
  exports in ~17 s; the TorchScript exporter (``dynamo=False``) gives the same accuracy but is deprecated.
- ONNX int8: ``onnxruntime.quantization.quantize_dynamic``: int8 weights per output channel, activations
  quantized per batch at run time. Only the matrix products with a weight are quantized, and the
  feed-forward down-projections (weights taller than wide) stay float32: their inputs are GELU outputs
  with outliers that one uint8 scale per tensor clips. On 1,024 XQuAD-R questions with e5-small, the
  minimum cosine to float32 was 0.974 quantizing every MatMul per tensor, 0.990 per channel, 0.988
  per channel on weights only, and 0.997 with the down-projections kept (mean 0.9987). The activation
  scale is taken per batch, so a query's int8 embedding moves slightly with its batch neighbours (by
  about 1e-4 in cosine): a cached embedding depends a little on the batch it was computed in.
- OpenVINO float32: ``openvino.convert_model`` of that ONNX graph, saved without the default float16
  compression.
- OpenVINO int8: ``nncf.quantize`` (static, ``ModelType.TRANSFORMER``, which applies SmoothQuant and bias
  correction), calibrated on real queries, as sentence-transformers' ``export_static_quantized_openvino_model``
  does through Optimum; minimum cosine 0.9973 on the same 1,024 questions.

What else was measured (``bench/onnx_int8_recipes.py``, e5-small, 2 cores, batches of 32): this recipe runs
1.44x PyTorch's batched queries/s. ONNX Runtime's BERT fusions (``optimize_model``; they match the TorchScript
exporter's graph with eager attention, not the dynamo graph) with ``QAttention`` reach 1.6x, also with the
down-projections in 8-bit blocks (``MatMulNBits``, min cosine 0.996); quantizing every MatMul reaches 1.96x but
drops 3 of 2,000 questions below 0.99 (min 0.988). None reaches 3x at a cosine of 0.99 on this CPU.

The folder must carry ``checksums.json`` and match it before anything is written; the new files are then
added to it (``export_files.record_files``), so the folder still verifies and ``publish`` can ship them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from ..atomic import replace_atomically
from ..modeling import OmniSearchSageQueryModel
from ..modeling.saved_folder import local_resolver, read_checksums, verify_folder
from .export_files import (
    RUNTIMES,
    ExportBackend,
    Quantize,
    check_backend,
    export_members,
    export_name,
    export_path,
    import_runtime,
    record_files,
)

logger = transformers_logging.get_logger(__name__)

ONNX_OPSET = 20
# Calibration queries that nncf reads at most (sentence-transformers' default for OpenVINO int8 is 300).
CALIBRATION_SIZE = 300


class _Backbone(torch.nn.Module):
    """The tower's backbone as the exported graph: token tensors in, ``last_hidden_state`` out."""

    def __init__(self, tower: OmniSearchSageQueryModel, input_names: Sequence[str]):
        super().__init__()
        self.backbone = tower.backbone
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(**dict(zip(self.input_names, inputs, strict=True))).last_hidden_state


def export_query_tower(
    folder: str | os.PathLike,
    backend: ExportBackend = "onnx",
    *,
    quantize: Quantize | None = None,
    calibration_queries: Sequence[str] | None = None,
) -> Path:
    """Export the backbone of the query tower saved in ``folder`` and record the files in its checksums.

    Every export starts from the backbone as ONNX float32: the folder's own ``model.onnx`` when it has one
    (verified), else a fresh ``torch.onnx.export`` of it.

    Args:
        folder: A folder written by ``OmniSearchSageQueryModel.save_pretrained`` (with ``checksums.json``).
        backend: ``"onnx"`` (ONNX Runtime) or ``"openvino"``.
        quantize: None (default) for float32, or ``"int8"``: dynamic int8 for ONNX, static int8 for OpenVINO.
        calibration_queries: Real queries for OpenVINO int8 (required there; the first 300 are used,
            ideally a sample of production traffic in every language served). Not used otherwise.

    Returns:
        The path of the exported file, e.g. ``folder/backbone/onnx/model_qint8_quantized.onnx`` (an
        existing export of the same name is replaced).

    Raises:
        ValueError: An unknown ``backend`` or ``quantize``, missing calibration queries, or a folder that
            does not match its ``checksums.json`` (or has none).
        ImportError: The backend's runtime is not installed (the message names the extra).

    Example:
        ```python
        export_query_tower("runs/x/query_tower", "onnx", quantize="int8")
        # PosixPath('runs/x/query_tower/backbone/onnx/model_qint8_quantized.onnx')
        encoder = load_query_encoder("runs/x/query_tower", "onnx", file_name="model_qint8_quantized.onnx")
        ```
    """
    check_backend(backend, ("onnx", "openvino"))
    file_name = export_name(backend, quantize)
    calibration = _calibration(backend, quantize, calibration_queries)
    # The exporter (torch.onnx's dynamo path runs on onnxscript), the quantizer, the runtime: all before any work.
    for module in ("onnx", "onnxscript", RUNTIMES[backend], *(["nncf"] if backend == "openvino" and quantize else [])):
        import_runtime(module, backend)
    folder = Path(folder)
    verify_folder(folder)  # exports of a changed folder would be recorded as if it were intact
    tower = OmniSearchSageQueryModel.from_pretrained(folder)
    if tower.tokenizer is None:
        raise ValueError(f"{os.fspath(folder)!r} has no tokenizer files: save the tower with its tokenizer first.")
    members = export_members(backend, file_name)
    target = folder / export_path(backend, file_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged outside the folder, so that a killed export leaves nothing in it that a push would upload.
    with tempfile.TemporaryDirectory(prefix="omnisearchsage-export-") as staging:
        staged = Path(staging) / file_name
        onnx_path = _float32_onnx(folder, backend, quantize)
        if onnx_path is None:
            onnx_path = Path(staging) / "float32.onnx"
            _export_onnx(tower, onnx_path)
        if backend == "onnx":
            _quantize_onnx(onnx_path, staged) if quantize else onnx_path.rename(staged)
        else:
            _export_openvino(onnx_path, staged, tower, calibration if quantize else None)
        for member in members:
            source = Path(staging) / Path(member).name
            replace_atomically(folder / member, lambda tmp, source=source: shutil.move(source, tmp))
    record_files(folder, members)
    logger.info(f"Exported {target} ({backend}, {quantize or 'float32'}).")
    return target


def _calibration(backend: str, quantize: str | None, queries: Sequence[str] | None) -> list[str]:
    """The calibration queries to use: required (non-empty strings) for OpenVINO int8, else unused."""
    if not (backend == "openvino" and quantize):
        if queries is not None:
            logger.warning(f"`calibration_queries` are used by OpenVINO int8 only; ignored for {backend} {quantize}.")
        return []
    if queries is None or isinstance(queries, str) or len(queries) == 0:
        raise ValueError(
            "OpenVINO int8 is calibrated on real queries: pass `calibration_queries`, a list of a few hundred "
            f"queries (got {type(queries).__name__})."
        )
    bad = [i for i, query in enumerate(queries) if not isinstance(query, str)]
    if bad:
        raise TypeError(f"`calibration_queries[{bad[0]}]` must be a str, got {type(queries[bad[0]]).__name__}.")
    return list(queries[:CALIBRATION_SIZE])


def _float32_onnx(folder: Path, backend: str, quantize: str | None) -> Path | None:
    """The folder's float32 ONNX export, as the source of the others, if it is there and recorded (so verified).

    Exporting again would give the same graph; reusing it saves the trace (~17 s for e5-small).
    """
    path = export_path("onnx", export_name("onnx"))
    recorded = read_checksums(local_resolver(folder), os.fspath(folder)) or {}
    if (backend, quantize) == ("onnx", None) or path not in recorded:
        return None
    return folder / path


def _export_onnx(tower: OmniSearchSageQueryModel, path: Path) -> None:
    """Write the backbone as one ONNX file with dynamic ``batch_size`` and ``sequence_length`` axes."""
    # Two queries of different lengths: a batch of one or a single token would let the tracer fix a size.
    features = tower.tokenize(["an example query", "a second, longer example query for the trace"])
    input_names = list(features)
    batch = torch.export.Dim("batch_size")
    sequence = torch.export.Dim("sequence_length", max=tower.config.backbone_config.max_position_embeddings)
    axes = {name: {0: batch, 1: sequence} for name in input_names}  # every input (bs, seq_len)
    with torch.no_grad():
        torch.onnx.export(
            _Backbone(tower, input_names).eval(),
            tuple(features.values()),
            str(path),
            input_names=input_names,
            output_names=["last_hidden_state"],
            dynamic_shapes=(tuple(axes.values()),),  # one entry: the `*inputs` of `forward`
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8, per channel, of the weight matrix products except the feed-forward down-projections."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=True).graph
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    keep_float = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        shapes = [weights[name] for name in node.input if name in weights]
        # No weight: an activation product (attention scores); a (d_in, d_out) weight with d_in > d_out:
        # a feed-forward down-projection, whose GELU inputs have outliers (see the module docstring).
        if not shapes or (len(shapes[0]) == 2 and shapes[0][0] > shapes[0][1]):
            keep_float.append(node.name)
    with _no_implicit_root_handler():
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep_float,
        )


@contextlib.contextmanager
def _no_implicit_root_handler() -> Iterator[None]:
    """Keep a library call from configuring the caller's logging.

    onnxruntime's quantizer logs through ``logging.warning``, which installs a handler on the root logger
    (``basicConfig``) when it has none: the caller's process would then print every library's warnings, to
    whatever ``sys.stderr`` was at that moment (a closed capture buffer, under pytest). A handler of ours
    while the call runs prevents that and is removed after it; the quantizer's advice (pre-process the
    model first) does not apply to these exports.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


def _export_openvino(source: Path, target: Path, tower: OmniSearchSageQueryModel, calibration: list[str]) -> None:
    """Convert the ONNX graph to OpenVINO IR (``.xml`` + ``.bin``), quantized to int8 if ``calibration`` is given."""
    import openvino

    model = openvino.convert_model(str(source))
    if calibration:
        import nncf

        def inputs(query: str) -> dict:
            return {name: tensor.numpy() for name, tensor in tower.tokenize([query]).items()}

        model = nncf.quantize(
            model,
            nncf.Dataset([inputs(query) for query in calibration]),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
        )
    openvino.save_model(model, str(target), compress_to_fp16=False)  # the default would halve the weights


__all__ = ["export_query_tower"]
