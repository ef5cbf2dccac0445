"""The docs cannot rot: every ```python block of docs/*.md runs here, on the
CPU (a page's blocks in order, as one script; in this process, or in a fresh
one for pages marked `<!-- docs-test: subprocess -->`, e.g. those that spawn
workers). A code block preceded by `<!-- docs-test: same-as PATH -->` must equal
the file PATH (relative to the repository root) — the C++ example, which
scripts/test.sh builds and runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import orchard

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))

_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
_SAME_AS = re.compile(r"<!-- docs-test: same-as (\S+) -->\s*\n```\w*[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def _python_blocks(text):
    return [body for lang, body in _BLOCK.findall(text) if lang == "python"]


def test_docs_exist():
    names = {p.name for p in DOCS}
    for page in ("flash_attn.md", "sdpa.md", "huggingface.md", "cpp.md", "distributed.md",
                 "numpy.md"):
        assert page in names


@pytest.mark.parametrize("page", [p for p in DOCS if _python_blocks(p.read_text())],
                         ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    text = page.read_text()
    script = "\n\n".join(_python_blocks(text))
    path = tmp_path / f"doc_{page.stem}.py"
    path.write_text(script)
    if "import jax" in script:
        pytest.importorskip("jax")
        pytest.importorskip("orchard._jax_ffi")
    if "transformers" in script:
        pytest.importorskip("transformers")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.setenv(var, "1")
    monkeypatch.chdir(tmp_path)
    if "<!-- docs-test: subprocess -->" in text:
        r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ))
        assert r.returncode == 0, f"{page.name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small examples: torch's threads only add contention here
    try:
        code = compile(script, str(path), "exec")
        exec(code, {"__name__": "__main__", "__file__": str(path)})
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_verbatim_blocks_match_files(page):
    for rel, body in _SAME_AS.findall(page.read_text()):
        assert (ROOT / rel).read_text() == body, f"{page.name}: block differs from {rel}"


def test_every_environment_variable_is_in_the_readme():
    """Each ORCHARD_* variable the library reads (a string literal in src/, include/ or python/)
    has its row in the README (its "Environment variables" table), so a new switch cannot ship
    undocumented."""
    names = set()
    for folder in ("src", "include", "python"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".cpp", ".h", ".cu", ".cuh", ".mm", ".metal"}:
                names.update(re.findall(r"[\"'](ORCHARD_[A-Z0-9_]+)[\"']", path.read_text(errors="replace")))
    assert len(names) >= 20, sorted(names)  # the scan found the switches at all
    readme = (ROOT / "README.md").read_text()
    missing = sorted(n for n in names if f"`{n}" not in readme)
    assert not missing, f"ORCHARD_* variables read by the code but not in README.md: {missing}"


def test_flash_entry_points_have_their_docstrings():
    # The shared argument docs are filled in by a decorator: a docstring built with + would be
    # an expression, and help() would show nothing.
    for fn in (orchard.flash_attn_func, orchard.flash_attn_varlen_func):
        doc = fn.__doc__ or ""
        assert "dropout_p:" in doc and "softcap:" in doc and "{flash_args}" not in doc, fn.__name__
