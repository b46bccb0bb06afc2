"""Output files (--json, --junit, --html) are checked before a run starts; nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe.errors import ConfigError
from probe.outfiles import check_output

ROOT = Path(__file__).resolve().parents[1]


def test_a_new_file_in_a_writable_directory_passes_and_leaves_nothing(tmp_path: Path) -> None:
    check_output("--json", tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []
    check_output("--json", None)


def test_an_existing_file_passes_untouched(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text("old")
    os.utime(p, (1_000_000, 1_000_000))
    check_output("--junit", p)
    assert p.read_text() == "old" and p.stat().st_mtime == 1_000_000
    assert list(tmp_path.iterdir()) == [p]


@pytest.mark.parametrize("where, problem", [
    ("/proc/x.json", "cannot be written: no file can be created in '/proc'"),
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/r.json", "does not exist"),
    ("/dev/null", "is not a regular file"),
    ("{tmp}/file/r.json", "does not exist"),
])
def test_an_unwritable_path_is_one_sentence(where: str, problem: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = where.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as e:
        check_output("--json", path)
    msg = str(e.value)
    assert msg.startswith(f"--json {path!r}") and problem in msg and msg.endswith(".")
    assert "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files and directories")
def test_a_read_only_file_or_directory_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro.xml"
    ro.write_text("")
    ro.chmod(0o444)
    with pytest.raises(ConfigError, match="cannot be written"):
        check_output("--junit", ro)
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o555)
    with pytest.raises(ConfigError, match="no file can be created"):
        check_output("--html", d / "h.html")


@pytest.mark.parametrize("argv", [
    ["run", "--duration", "5", "--json", "/proc/x.json"],
    ["canary", "--duration", "5", "--json", "/proc/x.json"],
    ["canary", "--duration", "5", "--junit", "/proc/j.xml"],
    ["canary", "--duration", "5", "--html", "/proc/h.html"],
    ["demo", "--duration", "5", "--json", "/proc/x.json"],
])
def test_the_run_never_starts_with_an_unwritable_output(argv: list[str]) -> None:
    if argv[0] != "demo":
        argv += ["--target", "ws://127.0.0.1:1/"]
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "probe.cli", *argv], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""  # no table, no "reference pipeline" line: nothing ran
    assert res.stderr.startswith("probe: --") and res.stderr.count("\n") == 1, res.stderr
    assert "'/proc/" in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 5.0
