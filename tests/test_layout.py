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
