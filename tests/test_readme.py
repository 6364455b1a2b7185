"""The README's Python snippets run as written and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
HUB_BACKBONE = '"sentence-transformers/all-MiniLM-L6-v2"'


def test_readme_snippets_run(tiny_backbone_dir, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        # Offline: the Hub backbone is swapped for a tiny local one with the same kind of folder.
        code = block.replace(HUB_BACKBONE, repr(str(tiny_backbone_dir)))
        expected = [c for c in re.findall(r"^print\(.*\)  # (.*)$", block, flags=re.M) if c[0] in "([{"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {})
        printed = out.getvalue().splitlines()
        for line in expected:
            assert line in printed, (line, printed)
