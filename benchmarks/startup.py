"""What loading the plugin costs: ``pytest --co`` on a folder with one plain test.

    python benchmarks/startup.py [--reps 15] [--no-bytecode]

Times a fresh ``python -m pytest --co -q`` in a temporary folder holding one plain test,
with the plugin (as installed, through its ``pytest11`` entry point) and with
``-p no:gradcheck``, interleaved, and prints the medians and their ratio (target: 1.05 or
less), in wall-clock time and in the run's CPU time (user + system, which a busy machine
disturbs far less than the wall clock; Unix only). It also prints the ``pytest_gradcheck`` modules the run imported and whether it
imported torch or yaml.

By default every module is read from cached bytecode, as in an installed environment: the
caches go to a temporary ``PYTHONPYCACHEPREFIX`` (nothing is written next to the sources)
and a first, untimed run fills them. ``--no-bytecode`` compiles every module from source
on each run instead (``PYTHONDONTWRITEBYTECODE``, no caches): pytest then also rewrites the
plugin's modules for assertions each time, so every line of them costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import json, sys, pytest\n"
    "code = pytest.main(sys.argv[1:])\n"
    "print(json.dumps({\n"
    "    'modules': sorted(m for m in sys.modules if m.startswith('pytest_gradcheck')),\n"
    "    'torch': 'torch' in sys.modules,\n"
    "    'yaml': 'yaml' in sys.modules,\n"
    "}))\n"
    "raise SystemExit(code)\n"
)


def _cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    folder: Path, extra: list[str], env: dict[str, str]
) -> tuple[float, float, dict[str, object]]:
    """Wall-clock seconds, CPU seconds and what one ``pytest --co`` run imported."""
    cpu = _cpu()
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--co", "-q", "-p", "no:cacheprovider", *extra],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    found: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, _cpu() - cpu, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed runs of each (default: 15)")
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="compile every module from source on each run (no bytecode caches)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "project"
        folder.mkdir()
        (folder / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
        (folder / "pytest.ini").write_text("[pytest]\n")
        env = dict(os.environ)
        if args.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "bytecode")
        *_, loaded = run(folder, [], env)  # fills the caches (file system and bytecode)
        run(folder, ["-p", "no:gradcheck"], env)
        with_plugin: list[tuple[float, float]] = []
        without: list[tuple[float, float]] = []
        for _ in range(args.reps):
            with_plugin.append(run(folder, [], env)[:2])
            without.append(run(folder, ["-p", "no:gradcheck"], env)[:2])
    bytecode = "compiled from source" if args.no_bytecode else "cached bytecode"
    print(f"pytest --co -q on one plain test, {args.reps} interleaved runs each ({bytecode})")
    print(f"{'medians':<26}{'wall clock':>12}{'CPU time':>12}")
    medians = []
    for label, runs in (("with pytest-gradcheck", with_plugin), ("with -p no:gradcheck", without)):
        wall, cpu = (statistics.median(times) for times in zip(*runs, strict=True))
        medians.append((wall, cpu))
        print(f"  {label:<24}{wall * 1e3:>9.1f} ms{cpu * 1e3:>9.1f} ms")
    (wall_a, cpu_a), (wall_b, cpu_b) = medians
    print(f"  {'ratio':<24}{wall_a / wall_b:>12.3f}{cpu_a / cpu_b:>12.3f}  (target <= 1.05)")
    print(f"  imported: {', '.join(loaded['modules'])}")  # type: ignore[arg-type]
    print(f"  torch imported: {loaded['torch']}; yaml imported: {loaded['yaml']}")
    return 1 if loaded["torch"] or loaded["yaml"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
