"""Where the tests find what the repository carries for them: the one place that knows the layout.

Everything the tests read is inside this checkout (a fresh clone runs the suite as is): the Open Responses OpenAPI
document in `spec/` and the recorded provider streams in `tests/fixtures/` (sources and licenses in
`spec/SOURCE.md` and `tests/fixtures/SOURCES.md`)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO_ROOT / "spec" / "openresponses-openapi.json"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
