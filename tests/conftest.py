"""Shared pytest setup: the repository root on sys.path, a deterministic torch, and a private runtime folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep tests on the CPU, offline and quiet, whatever the machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    # One intra-op thread: the tiny test models are dominated by threading overhead, and tests share the cores
    # with the backend subprocesses they start.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    """A private per-test runtime folder for connection files and job stores."""
    d = tmp_path / "runtime"
    d.mkdir()
    monkeypatch.setenv("STEPSTONE_RUNTIME_DIR", str(d))
    return d


# Every GLB a test writes anywhere under pytest's temporary folder (CLI outputs, job stores, backend subprocesses)
# is checked with the Khronos glTF Validator when the test ends; a file with any error fails that test.
_GLB_WATCH = None
_GLB_STATS = {"files": 0, "errors": 0, "warnings": 0}


@pytest.fixture(autouse=True)
def _written_glb_files_are_valid(request, tmp_path_factory):
    global _GLB_WATCH
    yield
    import gltf_validator

    if _GLB_WATCH is None:
        _GLB_WATCH = gltf_validator.GlbWatch(tmp_path_factory.getbasetemp())
    new = _GLB_WATCH.new_files()
    if not new or request.node.get_closest_marker("invalid_glb") is not None:
        return
    reports = gltf_validator.validate(new)
    _GLB_STATS["files"] += len(reports)
    _GLB_STATS["errors"] += sum(r["numErrors"] for r in reports.values())
    _GLB_STATS["warnings"] += sum(r["numWarnings"] for r in reports.values())
    bad = [gltf_validator.describe(p, r) for p, r in reports.items() if r["numErrors"]]
    if bad:
        pytest.fail("the Khronos glTF Validator found errors in GLB files written by this test:\n" + "\n".join(bad))


def pytest_terminal_summary(terminalreporter):
    if _GLB_STATS["files"]:
        terminalreporter.write_line("Khronos glTF Validator: {files} GLB files written by the tests checked, "
                                    "{errors} errors, {warnings} warnings".format(**_GLB_STATS))
