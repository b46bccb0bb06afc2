"""The probe users' Locust task lists (in a subprocess: importing Locust monkey-patches)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_open_model_user_runs_only_its_own_task() -> None:
    code = (
        "import importlib.util as u\n"
        "s = u.spec_from_file_location('lo', 'scenarios/locust_open.py')\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "from probe.locust import AudioProbeUser\n"
        "print([t.__qualname__ for t in m.OpenSpeechUser.tasks])\n"
        "print([t.__qualname__ for t in AudioProbeUser.tasks])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-2000:]
    open_tasks, closed_tasks = res.stdout.strip().splitlines()[-2:]
    assert open_tasks == "['OpenAudioProbeUser.stream']"
    assert closed_tasks == "['AudioProbeUser.stream']"
