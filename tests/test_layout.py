"""The architecture the layout promises: the core packages are sans-I/O."""

from __future__ import annotations

import ast
from pathlib import Path

PROBE = Path(__file__).resolve().parents[1] / "probe"
CORE = ("audio", "watermark", "protocol", "measure", "session")
SHELL_ONLY = {"socket", "asyncio", "gevent", "threading", "websockets", "selectors"}


def test_no_core_module_imports_sockets_event_loops_or_threads() -> None:
    offenders = []
    for package in CORE:
        for path in sorted((PROBE / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in SHELL_ONLY:
                        offenders.append(f"{path.relative_to(PROBE)}: {name}")
    assert offenders == []


def test_the_protocol_document_is_kept_in_step_with_the_shared_one() -> None:
    import os

    import pytest

    root = PROBE.parent
    shared = root.parent / "shared" / "PROTOCOL.md"
    if not shared.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{shared} is missing: CI runs with ../shared beside the checkout")
        pytest.skip("no ../shared beside this checkout")
    assert (root / "docs" / "protocol.md").read_text() == shared.read_text()


def test_readme_and_docs_link_only_to_files_that_exist() -> None:
    import re

    root = PROBE.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            path = (doc.parent / target).resolve()
            if "shared" in path.parts:
                continue  # beside the checkout, not in it
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
