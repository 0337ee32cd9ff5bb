"""What loading the plugin costs: ``pytest --co`` on a suite that never checks gradients.

    python benchmarks/startup.py [--reps 7]

Times a fresh ``python -m pytest --co -q`` on a one-test suite, with the plugin (as
installed, through its ``pytest11`` entry point) and with ``-p no:gradcheck``, interleaved,
and prints the medians and their ratio. It also reports whether the run imported torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import sys, pytest\n"
    "code = pytest.main(sys.argv[1:])\n"
    "print('TORCH_IMPORTED=' + str('torch' in sys.modules))\n"
    "raise SystemExit(code)\n"
)


def run(folder: Path, extra: list[str]) -> tuple[float, bool]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--co", "-q", "-p", "no:cacheprovider", *extra],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, "TORCH_IMPORTED=True" in out.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
        (folder / "pytest.ini").write_text("[pytest]\n")
        run(folder, [])  # warm the file system caches
        with_plugin: list[float] = []
        without: list[float] = []
        torch_loaded = False
        for _ in range(args.reps):
            seconds, loaded = run(folder, [])
            with_plugin.append(seconds)
            torch_loaded |= loaded
            without.append(run(folder, ["-p", "no:gradcheck"])[0])
    a, b = statistics.median(with_plugin), statistics.median(without)
    print(f"pytest --co, {args.reps} interleaved runs each")
    print(f"  with pytest-gradcheck   median {a * 1e3:7.1f} ms")
    print(f"  with -p no:gradcheck    median {b * 1e3:7.1f} ms")
    print(f"  ratio {a / b:.3f}; torch imported: {torch_loaded}")
    return 1 if torch_loaded else 0


if __name__ == "__main__":
    raise SystemExit(main())
