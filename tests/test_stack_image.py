"""The Dockerfile (no Docker engine here, so its promises are checked as text): the base image
pinned by tag and digest, pinned packages, non-root, `probe` as entry point, and every file it
copies tracked in git and not excluded by .dockerignore; deploy/constraints.txt pins every
runtime dependency at a version pyproject allows."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "deploy/constraints.txt"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(
        rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest
    )


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.strip("/")
        if any(regex(pat).match(c) for c in candidates):
            excluded = not negate
    return excluded


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_base_image_is_python_3_11_slim_pinned_by_tag_and_digest() -> None:
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 2
    image = _args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)


def test_runs_as_a_non_root_user_with_probe_as_entry_point() -> None:
    ins = _instructions()
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["probe"]') in ins
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "PROBE_FIXTURES=/opt/probe/audio_fixtures" in env


def test_system_and_python_packages_are_pinned() -> None:
    ins = _instructions()
    runs = " && ".join(rest for word, rest in ins if word == "RUN")
    assert '"libsndfile1=${LIBSNDFILE_VERSION}"' in runs
    assert re.fullmatch(r"\d[\w.+~-]*", _args()["LIBSNDFILE_VERSION"])
    assert "pip install --only-binary=:all: -r /tmp/constraints.txt" in runs
    assert "pip install --no-deps --no-build-isolation ." in runs
    assert "pip check" in runs
    for m in re.finditer(r"pip install [^&]*", runs):
        for word in m.group(0).split()[2:]:
            if not word.startswith(("-", "/", ".")):
                assert "==" in word, f"{word} is installed unpinned"


def test_every_copied_path_is_tracked_and_reaches_the_build_context() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True, timeout=30
    ).stdout.splitlines()
    patterns = _ignore_patterns()
    copies = [rest for word, rest in _instructions() if word == "COPY"]
    sources = [c.split()[0] for c in copies if not c.startswith("--from")]
    assert {"deploy/constraints.txt", "probe", "audio_fixtures", "scenarios"} <= set(sources)
    for src in sources:
        files = [f for f in tracked if f == src or f.startswith(src.rstrip("/") + "/")]
        assert files, f"COPY {src}: nothing tracked in git there (a fresh clone has no {src})"
        sent = [f for f in files if not _dockerignore_excludes(f, patterns)]
        assert sent, f"COPY {src}: .dockerignore excludes all of it"
    # What the image needs at run time is in the context; the rest of the tree is not.
    for needed in ("probe/cli.py", "audio_fixtures/speech_en_us.wav", "pyproject.toml"):
        assert not _dockerignore_excludes(needed, patterns), needed
    for left_out in ("tests/test_stack_image.py", ".git/HEAD", "probe/__pycache__/x.pyc"):
        assert _dockerignore_excludes(left_out, patterns), left_out


def test_constraints_pin_every_runtime_dependency_within_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _pins()
    assert len(pins) >= len(project["dependencies"])
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


def test_constraints_cover_what_the_pinned_packages_need_here() -> None:
    """Every requirement of a pinned package installed here at its pinned version is pinned
    too, so the image's `pip check` cannot meet a missing package. (Packages installed here at
    another version say nothing about the pinned one's requirements.)"""
    from importlib import metadata

    pins = _pins()
    missing = []
    checked = 0
    for name in pins:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != pins[name]:
            continue
        checked += 1
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in pins:
                missing.append(f"{name} needs {req.name}")
    assert checked, "no pinned package is installed here at its pinned version"
    assert not missing, missing
