"""Query-tower backends: export to ONNX / OpenVINO (float32, int8) -> load -> encode like the PyTorch tower;
the folder's checksums, sentence-transformers' file layout, publishing, and the service on ONNX."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from omnisearchsage_hf import OmniSearchSageQueryModel
from omnisearchsage_hf.backends import copy_exports, export_name, export_query_tower, load_query_encoder
from omnisearchsage_hf.backends.cli import main as export_main
from omnisearchsage_hf.modeling.saved_folder import verify_folder

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_OV = importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None
needs_ort = pytest.mark.skipif(
    not HAS_ORT, reason="onnxruntime is not installed: pip install 'omnisearchsage-hf[onnx]'"
)
needs_ov = pytest.mark.skipif(
    not HAS_OV, reason="openvino or nncf is not installed: pip install 'omnisearchsage-hf[openvino]'"
)
EXPORTS = [
    pytest.param("onnx", None, marks=needs_ort, id="onnx-float32"),
    pytest.param("onnx", "int8", marks=needs_ort, id="onnx-int8"),
    pytest.param("openvino", None, marks=needs_ov, id="openvino-float32"),
    pytest.param("openvino", "int8", marks=needs_ov, id="openvino-int8"),
]
QUERIES = ["antique copper bathroom sink", "red dress", "kitchen lamp", "wall art!", "日本語", "กขค", "مرحبا", ""]
QUERIES += ["summer shoes " * 30, "copper \ud83d sink"]  # longer than max_length; a lone surrogate


@pytest.fixture(scope="module")
def tower(tiny_backbone_dir):
    torch.manual_seed(3)
    return OmniSearchSageQueryModel.from_backbone(
        tiny_backbone_dir, out_dim=16, pooling="mean", query_prefix="query: ", max_length=12
    )


@pytest.fixture(scope="module")
def exported(tower, tmp_path_factory, pytestconfig) -> Path:
    """The tower saved, with all four exports (those whose runtime is installed); ONNX float32 via the command.

    Made with pytest's output capture off: torch.onnx, nncf and onnxruntime create logging handlers on first
    use, bound to the ``sys.stdout`` / ``sys.stderr`` of that moment; a capture buffer there is closed after
    the test and breaks every later test's capture.
    """
    folder = tmp_path_factory.mktemp("backends") / "query_tower"
    tower.save_pretrained(folder)
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        if HAS_ORT:
            assert export_main([str(folder), "--backend", "onnx"]) == 0
            export_query_tower(folder, "onnx", quantize="int8")
        if HAS_OV:
            export_query_tower(folder, "openvino")
            export_query_tower(folder, "openvino", quantize="int8", calibration_queries=QUERIES * 5)
    return folder


@pytest.mark.parametrize(("backend", "quantize"), EXPORTS)
def test_each_backend_encodes_like_the_torch_tower(tower, exported, backend, quantize):
    encoder = load_query_encoder(exported, backend, file_name=export_name(backend, quantize), num_threads=1)
    expected = tower.encode(QUERIES)  # (n, 16), unit norm
    found = encoder.encode(QUERIES, batch_size=3)
    assert found.shape == expected.shape and found.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)
    cosines = (found * expected).sum(axis=1)
    if quantize is None:
        np.testing.assert_allclose(found, expected, atol=2e-5)
    else:  # int8 of a tiny random model: measured >= 0.9999; a wrong pooling or prefix gives < 0.9
        assert cosines.min() >= 0.995, cosines
    # The rest of `encode`'s contract, as the tower's: one string in, one vector out; a Matryoshka prefix.
    # (Dynamic int8 scales activations per batch, so a query's int8 embedding shifts slightly with its batch.)
    single = encoder.encode(QUERIES[0])
    assert single.shape == (16,) and np.allclose(single, found[0], atol=1e-5 if quantize is None else 2e-3)
    prefix = encoder.encode(QUERIES[:3], truncate_dim=4, convert_to_tensor=True)
    reference = tower.encode(QUERIES[:3], truncate_dim=4, convert_to_tensor=True)
    assert isinstance(prefix, torch.Tensor) and prefix.shape == (3, 4)
    assert torch.nn.functional.cosine_similarity(prefix, reference).min() >= 0.99


def test_the_folder_still_verifies_and_loads_after_the_exports(exported, tower):
    verify_folder(exported)  # every recorded file, the exports included
    recorded = json.loads((exported / "checksums.json").read_text())["files"]
    if HAS_ORT:
        assert {"backbone/onnx/model.onnx", "backbone/onnx/model_qint8_quantized.onnx"} <= set(recorded)
    if HAS_OV:
        xml = "backbone/openvino/openvino_model_qint8_quantized.xml"
        assert {xml, xml.replace(".xml", ".bin"), "backbone/openvino/openvino_model.xml"} <= set(recorded)
    reloaded = load_query_encoder(exported, "torch")
    assert isinstance(reloaded, OmniSearchSageQueryModel)
    np.testing.assert_allclose(reloaded.encode(QUERIES), tower.encode(QUERIES), atol=1e-6)


@needs_ort
def test_files_are_where_sentence_transformers_looks_for_them(exported):
    """sentence-transformers' own resolution (the step before Optimum loads the file) finds each export.

    ``SentenceTransformer(folder, backend="onnx")`` itself needs Optimum, which does not install beside
    transformers 5 yet; this is the part of it that decides which file it reads.
    """
    from sentence_transformers.backend.utils import backend_should_export

    for backend, target, pattern, names in (
        ("ONNX", "model.onnx", "*.onnx", ["model.onnx", "model_qint8_quantized.onnx"]),
        ("OpenVINO", "openvino_model.xml", "openvino*.xml", ["openvino_model_qint8_quantized.xml"] if HAS_OV else []),
    ):
        for name in names:
            export, kwargs = backend_should_export(
                exported / "backbone", True, {"file_name": name}, target, pattern, backend
            )
            assert not export and kwargs == {"file_name": name, "subfolder": backend.lower()}
            assert (exported / "backbone" / kwargs["subfolder"] / kwargs["file_name"]).is_file()


@needs_ort
def test_a_changed_or_unrecorded_export_is_refused(exported, tmp_path):
    folder = tmp_path / "query_tower"
    shutil.copytree(exported, folder)
    onnx_file = folder / "backbone" / "onnx" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.onnx.*does not match checksums\.json"):
        load_query_encoder(folder, "onnx")
    shutil.copyfile(exported / "backbone" / "onnx" / "model.onnx", folder / "backbone" / "onnx" / "other.onnx")
    with pytest.raises(ValueError, match=r"other\.onnx.*not recorded in checksums\.json"):
        load_query_encoder(folder, "onnx", file_name="other.onnx")
    with pytest.raises(ValueError, match="does not match"):
        export_query_tower(folder, "onnx")  # a changed folder is not exported, nor its checksums rewritten


def test_errors_name_the_backend_the_file_the_command_and_the_extra(tower, tmp_path, monkeypatch):
    folder = tmp_path / "query_tower"
    tower.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"`backend` must be one of \['torch', 'onnx', 'openvino'\], got 'tensorrt'"):
        load_query_encoder(folder, "tensorrt")
    with pytest.raises(ValueError, match=r"one of \['onnx', 'openvino'\], got 'torch'"):
        export_query_tower(folder, "torch")
    with pytest.raises(ValueError, match="`file_name` selects an ONNX or OpenVINO export"):
        load_query_encoder(folder, "torch", file_name="model.onnx")
    with pytest.raises(FileNotFoundError) as missing:
        load_query_encoder(folder, "onnx", file_name="model_qint8_quantized.onnx")
    message = str(missing.value)
    assert "backbone/onnx/model_qint8_quantized.onnx" in message and "exports found: none" in message
    assert f"python -m omnisearchsage_hf.backends.cli {folder} --backend onnx --quantize int8" in message
    with pytest.raises(ValueError, match="pass `calibration_queries`"):
        export_query_tower(folder, "openvino", quantize="int8")
    with pytest.raises(ValueError, match="`quantize` must be None"):
        export_query_tower(folder, "onnx", quantize="int4")
    for module, backend, extra in (("onnxruntime", "onnx", "onnx"), ("openvino", "openvino", "openvino")):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        with pytest.raises(ImportError, match=rf"pip install 'omnisearchsage-hf\[{extra}\]'"):
            export_query_tower(folder, backend)
    (folder / "backbone" / "onnx").mkdir()
    (folder / "backbone" / "onnx" / "model.onnx").write_bytes(b"not checked before the runtime is found")
    with pytest.raises(ImportError, match=r"needs the `onnxruntime` package"):
        load_query_encoder(folder, "onnx")


def test_export_command_refuses_bad_input(tmp_path, exported, capsys):
    assert export_main([str(tmp_path), "--backend", "onnx"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert export_main([str(exported), "--backend", "openvino", "--quantize", "int8"]) == 2
    assert "pass `calibration_queries`" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = [str(exported), "--backend", "openvino", "--quantize", "int8", "--calibration-queries"]
    assert export_main([*argv, str(tmp_path / "empty.txt")]) == 2
    assert "holds no queries" in capsys.readouterr().err


@needs_ort
def test_copy_exports_carries_them_into_a_folder_saved_again(exported, tower, tmp_path):
    """What publishing needs: a tower saved anew (no exports) gets the run's exports, checksums and all."""
    target = tmp_path / "published"
    tower.save_pretrained(target)
    copied = copy_exports(exported, target)
    assert "backbone/onnx/model_qint8_quantized.onnx" in copied
    verify_folder(target)
    encoder = load_query_encoder(target, "onnx", file_name="model_qint8_quantized.onnx")
    source = load_query_encoder(exported, "onnx", file_name="model_qint8_quantized.onnx")
    np.testing.assert_array_equal(encoder.encode(QUERIES), source.encode(QUERIES))


@needs_ort
def test_publish_ships_the_exports(exported, make_entity_tower, tmp_path):
    from omnisearchsage_hf.publishing import publish

    run = tmp_path / "run"
    shutil.copytree(exported, run / "query_tower")
    make_entity_tower(out_dim=16).save_pretrained(run / "entity_tower")
    folders = publish(run, "org/omni", push=False, local_dir=tmp_path / "published")
    query_folder = folders["org/omni-query"]
    verify_folder(query_folder)
    assert (query_folder / "backbone" / "onnx" / "model_qint8_quantized.onnx").is_file()


@needs_ort
def test_the_service_answers_with_the_onnx_backend(exported, tower, monkeypatch):
    from omnisearchsage_hf.serving import service as service_module
    from omnisearchsage_hf.serving.cli import serve_main

    runs = []
    monkeypatch.setattr(service_module, "serve", lambda app, **kwargs: runs.append(app))
    threads = torch.get_num_threads()
    try:
        argv = ["--query-model", str(exported), "--backend", "onnx"]
        assert serve_main([*argv, "--backend-file", "model_qint8_quantized.onnx"]) == 0
        assert serve_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(runs) == 2
    expected = tower.encode(["red dress", "copper sink"])
    for app, atol in ((runs[0], 0.05), (runs[1], 2e-5)):
        with TestClient(app) as client:
            for query, vector in zip(["red dress", "copper sink"], expected, strict=True):
                answer = client.post("/embed/query", json={"query": query})
                assert answer.status_code == 200
                np.testing.assert_allclose(answer.json()["embedding"], vector, atol=atol)
            assert client.get("/health").json()["cache"]["misses"] == 2


@needs_ort
def test_serve_errors_name_the_flag_and_the_export_command(exported, capsys, monkeypatch):
    from omnisearchsage_hf.serving import service as service_module
    from omnisearchsage_hf.serving.cli import serve_main

    monkeypatch.setattr(service_module, "serve", lambda app, **kwargs: pytest.fail("must not serve"))
    assert serve_main(["--query-model", str(exported), "--backend-file", "model.onnx"]) == 2
    assert "--backend-file names an ONNX or OpenVINO export" in capsys.readouterr().err
    assert serve_main(["--query-model", str(exported), "--backend", "onnx", "--backend-file", "model_x.onnx"]) == 2
    error = capsys.readouterr().err
    assert "backbone/onnx/model_x.onnx" in error and "is missing" in error
