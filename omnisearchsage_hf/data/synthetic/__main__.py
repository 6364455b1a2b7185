"""Command line: write a synthetic world, ``python -m omnisearchsage_hf.data.synthetic --out DIR ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from .config import SyntheticWorldConfig
from .world import generate_world


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m omnisearchsage_hf.data.synthetic --out DIR [--num-pins N ...]``.

    Every ``SyntheticWorldConfig`` field is a flag (``--num-pins``, ``--noise-rate``, ``--languages
    en,de,ja``...). Prints the counts as JSON.
    """
    parser = argparse.ArgumentParser(
        prog="python -m omnisearchsage_hf.data.synthetic",
        description="Write a synthetic OmniSearchSage world (parquet + world.json).",
    )
    parser.add_argument("--out", required=True, help="Output folder (created if missing).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    for field in dataclasses.fields(SyntheticWorldConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "languages":
            parser.add_argument(
                flag, default=",".join(field.default), help="comma-separated codes (default %(default)s)"
            )
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help="default %(default)s")
    args = vars(parser.parse_args(argv))
    out, quiet = args.pop("out"), args.pop("quiet")
    args["languages"] = tuple(code.strip() for code in args["languages"].split(",") if code.strip())
    world = generate_world(SyntheticWorldConfig(**args), show_progress_bar=not quiet)
    world.save(out, show_progress_bar=not quiet)
    print(json.dumps({"out": str(out), **world.counts()}, sort_keys=True))
    return 0


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
