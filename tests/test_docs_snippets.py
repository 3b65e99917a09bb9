"""Every ```python snippet in README.md and docs/*.md runs as written.

The snippets of one page run in order, in one fresh interpreter (a later snippet may use what an
earlier one defined), in an empty working folder, offline. Pages whose snippets talk to the Hub get
the local Hub test double (``HF_ENDPOINT``) instead of huggingface.co. A shell block fenced as
```` ```bash runnable ```` (GitHub shows it as plain bash) runs first, from the repository root,
with the package's commands on PATH; other shell blocks show usage or long jobs (``make
quickstart``, ``accelerate launch`` on MovieLens) that the CLI tests and the quickstart exercise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SHELL_FENCE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_snippets(page: Path) -> list[str]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


def shell_snippets(page: Path) -> list[str]:
    return SHELL_FENCE.findall(page.read_text(encoding="utf-8"))


def pages_with_snippets() -> list[Path]:
    return [page for page in PAGES if python_snippets(page) or shell_snippets(page)]


def test_fence_pattern_finds_snippets():
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\nprint(x)\n```\n"
    page = REPO_ROOT / "tests" / "_fence_probe.md"
    try:
        page.write_text(text + "```bash runnable\necho hi\n```\n", encoding="utf-8")
        assert python_snippets(page) == ["x = 1\n", "print(x)\n"]
        assert shell_snippets(page) == ["echo hi\n"]
    finally:
        page.unlink()


def test_the_readme_has_a_python_example():
    assert python_snippets(REPO_ROOT / "README.md"), "README.md must show a short Python example"


@pytest.mark.parametrize("page", pages_with_snippets(), ids=lambda page: page.relative_to(REPO_ROOT).as_posix())
def test_page_snippets_run_as_written(page: Path, tmp_path, request):
    source = "\n".join(f"# ---- snippet {i + 1} of {page.name}\n{snippet}" for i, snippet in
                       enumerate(python_snippets(page)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    if "from_pretrained(\"my-org/" in source or "_hub(" in source or "push_to_hub" in source:
        hub = request.getfixturevalue("hub_server")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_OFFLINE": "0",
                    "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for i, shell in enumerate(shell_snippets(page)):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{page.name}: shell block {i + 1} failed\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    script = tmp_path / "snippets.py"
    script.write_text(source, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{page.name}: snippets failed\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
