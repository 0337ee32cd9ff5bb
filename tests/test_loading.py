"""Loading the plugin costs nothing: neither ``pytest --help`` nor ``import pytest_gradcheck``
nor a run of tests that never check gradients imports torch, and ``pytest --help`` or
``pytest --co`` on a plain test imports only the plugin's light modules (no policy, so no
yaml; no suite, no checks, no engine).

Each check runs in a fresh interpreter (this one has torch loaded already), on the package
of this checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pytest_gradcheck

ROOT = Path(pytest_gradcheck.__file__).resolve().parent.parent

#: The modules that loading the plugin imports (``pytest --help``, ``pytest --co`` on a test
#: that checks nothing): the options, the marker, the run's settings, the hook specs, the
#: escaping functions the session's output goes through and the module-path helpers the
#: failure text groups with (plain Python).
LOADED = [
    "pytest_gradcheck",
    "pytest_gradcheck.escape",
    "pytest_gradcheck.hookspecs",
    "pytest_gradcheck.paths",
    "pytest_gradcheck.plugin",
    "pytest_gradcheck.properties",
    "pytest_gradcheck.results",
    "pytest_gradcheck.session",
    "pytest_gradcheck.settings",
]


def run_python(code: str, cwd: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT)  # this checkout's package, whatever is installed
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_pytest_help_does_not_import_torch(tmp_path: Path) -> None:
    result = run_python(
        """
        import contextlib, io, json, sys
        import pytest

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = pytest.main(["--help"])
        print(json.dumps({
            "code": int(code),
            "plugin": "pytest_gradcheck.plugin" in sys.modules,
            "options": "--gradcheck-max-norm" in out.getvalue(),
            "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
        }))
        """,
        tmp_path,
    )
    assert result == {"code": 0, "plugin": True, "options": True, "torch": []}


@pytest.mark.parametrize("args", [["--help"], ["--co", "-q"]], ids=["help", "collect-only"])
def test_loading_the_plugin_imports_only_its_light_modules(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    result = run_python(
        f"""
        import contextlib, io, json, sys
        import pytest

        with contextlib.redirect_stdout(io.StringIO()):
            code = pytest.main([*{args!r}, "-p", "no:cacheprovider"])
        print(json.dumps({{
            "code": int(code),
            "modules": sorted(m for m in sys.modules if m.startswith("pytest_gradcheck")),
            "heavy": sorted(m for m in ("torch", "yaml", "numpy", "junitparser") if m in sys.modules),
        }}))
        """,
        tmp_path,
    )
    assert result == {"code": 0, "modules": LOADED, "heavy": []}


def test_import_does_not_import_torch_or_pytest(tmp_path: Path) -> None:
    result = run_python(
        """
        import json, sys
        import pytest_gradcheck
        from pytest_gradcheck import Report, Settings, GradientHealthError

        heavy = sorted(m for m in ("torch", "pytest", "_pytest") if m in sys.modules)
        marker = pytest_gradcheck.gradient_health  # lazy: needs pytest, still not torch
        print(json.dumps({
            "heavy": heavy,
            "marker": marker.name,
            "torch_after_marker": "torch" in sys.modules,
        }))
        """,
        tmp_path,
    )
    assert result == {"heavy": [], "marker": "gradient_health", "torch_after_marker": False}


def test_tests_without_checks_do_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = --strict-markers\nfilterwarnings =\n    error\n")
    pytester.makepyfile(
        """
        import sys

        import pytest

        from pytest_gradcheck import gradient_health


        @pytest.mark.parametrize("i", range(3))
        def test_plain(i):
            assert "torch" not in sys.modules


        @gradient_health(max_norm=1e3)
        def test_marked_then_fails_without_model():
            assert "torch" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # The marked test fails (no gradcheck call, no model fixture) without loading torch.
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*is marked gradient_health but ran no gradient check*"])


def test_lazy_names_resolve() -> None:
    import pytest_gradcheck

    # Compared by name: pytester's in-process runs may re-import the engine module.
    check = pytest_gradcheck.check_gradients
    assert (check.__module__, check.__qualname__) == ("pytest_gradcheck.api", "check_gradients")
    assert pytest_gradcheck.gradient_health.name == "gradient_health"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = pytest_gradcheck.nope
