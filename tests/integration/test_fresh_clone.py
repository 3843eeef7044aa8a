"""The repository is self-contained: a fresh clone of HEAD, with nothing beside it, collects the whole suite, and no
tracked file reaches outside the checkout for reference material (the spec and the recorded streams live in
`spec/` and `tests/fixtures/`, found through `tests/support/paths.py`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

# The reference folder beside the checkout, spelled as a relative path or as a quoted segment of a pathlib join (as
# the fakes once read it). Built from pieces, and described without an example, so that this file does not match.
_OUTSIDE = "../" + "shared"
_Q = "[\"']"
OUTSIDE_REFERENCE = re.compile(rf"{re.escape(_OUTSIDE)}|/\s*{_Q}shared{_Q}|{_Q}shared{_Q}\s*/".encode())


def _git(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    # safe.directory: a CI runner may check the repository out as another user than the one running the tests.
    return subprocess.run(["git", "-c", f"safe.directory={REPO_ROOT}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _checkout_root() -> Path | None:
    if shutil.which("git") is None:
        return None
    top = _git("rev-parse", "--show-toplevel")
    return Path(top.stdout.strip()).resolve() if top.returncode == 0 else None


pytestmark = pytest.mark.skipif(_checkout_root() != REPO_ROOT.resolve(),
                                reason="not inside a git checkout of this repository (nothing to clone)")


@pytest.mark.timeout(300)  # a clone and a full collection on a busy machine
def test_fresh_clone_collects_the_suite(tmp_path: Path) -> None:
    head = _git("rev-parse", "HEAD").stdout.strip()
    clone = tmp_path / "x"  # tmp_path is empty: the clone has no siblings to lean on
    cloned = _git("clone", "-q", "--no-hardlinks", str(REPO_ROOT), str(clone), cwd=tmp_path)
    assert cloned.returncode == 0, cloned.stderr
    checkout = _git("checkout", "-q", "--detach", head, cwd=clone)
    assert checkout.returncode == 0, checkout.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]

    # The clone's own package and tests, not the editable install of this checkout.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(clone / "layers"), str(clone)])
    where = subprocess.run([sys.executable, "-c", "import unbroken, tests; print(unbroken.__file__, tests.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert all(Path(f).resolve().is_relative_to(clone.resolve()) for f in where.stdout.split()), where.stdout

    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=240)
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"collection failed in a fresh clone:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    found = re.match(r"(\d+) tests? collected", tail)
    assert found and int(found.group(1)) > 0, tail
    assert "error" not in tail.lower(), tail


def test_no_tracked_file_reads_outside_the_repository() -> None:
    files = _git("ls-files", "-z").stdout.split("\0")
    offenders = []
    for name in filter(None, files):
        path = REPO_ROOT / name
        if name.endswith(".md") or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                offenders.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, "files that reach outside the checkout:\n" + "\n".join(offenders)
