"""Fast CPU inference of the query tower: ONNX Runtime and OpenVINO backends, float32 and int8.

``export_query_tower(folder, "onnx" | "openvino", quantize=None | "int8")`` writes an export of a saved
tower's backbone into its folder, where ``SentenceTransformer(folder, backend=...)`` also looks for it;
``load_query_encoder(folder, backend)`` returns an object with the tower's ``encode()``. Needs the
``onnx`` or ``openvino`` extra (``pip install 'omnisearchsage-hf[onnx]'``); the runtimes are imported only
when a backend is used. The command: ``python -m omnisearchsage_hf.backends.cli FOLDER --backend onnx``.
"""

from .encoder import QueryEncoder, load_query_encoder
from .export import export_query_tower
from .export_files import BACKENDS, EXPORT_NAMES, copy_exports, export_name, exported_files

__all__ = [
    "BACKENDS",
    "EXPORT_NAMES",
    "QueryEncoder",
    "copy_exports",
    "export_name",
    "export_query_tower",
    "exported_files",
    "load_query_encoder",
]
