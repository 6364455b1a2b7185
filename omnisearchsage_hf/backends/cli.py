"""``omnisearchsage-export``: export a saved query tower to ONNX or OpenVINO (float32 or int8), in place.

```bash
python -m omnisearchsage_hf.backends.cli runs/x/query_tower --backend onnx --quantize int8
python -m omnisearchsage_hf.backends.cli runs/x/query_tower --backend openvino --quantize int8 \\
    --calibration-queries queries.txt          # one real query per line; the first 300 are used
omnisearchsage-serve --query-model runs/x/query_tower --backend onnx --backend-file model_qint8_quantized.onnx
```
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli_errors import UsageError, run_command
from .export_files import EXPORT_BACKENDS


def main(argv: Sequence[str] | None = None) -> int:
    """Export the backbone of a saved query tower into its folder and record it in its checksums.json."""
    parser = argparse.ArgumentParser(prog="omnisearchsage-export", description=main.__doc__)
    parser.add_argument("folder", help="Query tower folder (save_pretrained output), e.g. runs/x/query_tower.")
    parser.add_argument("--backend", choices=EXPORT_BACKENDS, required=True)
    parser.add_argument("--quantize", choices=("int8",), default=None, help="int8 (default: float32).")
    parser.add_argument(
        "--calibration-queries",
        default=None,
        help="UTF-8 text file, one real query per line: calibrates OpenVINO int8 (required there).",
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _export(args), ["--debug"] if args.debug else [])


def _export(args: argparse.Namespace) -> int:
    from .export import export_query_tower

    if not (Path(args.folder) / "config.json").is_file():
        raise UsageError(f"{args.folder!r} has no config.json: pass a saved query tower folder (runs/x/query_tower).")
    queries = None
    if args.calibration_queries is not None:
        path = Path(args.calibration_queries)
        if not path.is_file():
            raise UsageError(f"--calibration-queries {args.calibration_queries!r} is not a file.")
        queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not queries:
            raise UsageError(f"--calibration-queries {args.calibration_queries!r} holds no queries.")
    path = export_query_tower(args.folder, args.backend, quantize=args.quantize, calibration_queries=queries)
    print(json.dumps({"export": str(path), "bytes": path.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
