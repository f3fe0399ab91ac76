"""The planted-bug regression set: each bug issue 14 found slipping past the tests must now fail them.

Every `mutation/planted/NN-name.patch` is one realistic bug in the code that carries a guarantee. For each
patch this copies the repository (tracked and not-ignored files) to a temporary directory, applies the
patch there, and runs the test suite as `make test` does, with the guarantee tests first and `-x`, so the
first test that notices the bug ends the run. It prints, per patch, caught or NOT caught and the first
failing test; the exit status is non-zero when any bug got through or a patch no longer applies.
Usage: python scripts/planted.py [--only 03 07] [--report out.json] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANTED = ROOT / "mutation" / "planted"
# The tests behind the guarantees, fastest judges first (then the tests/test_mutants_*.py files, then the
# process-level ones); a file that does not exist (yet) is left out.
GUARANTEE_TESTS = [
    "tests/test_lock_discipline.py",
    "tests/test_vault.py",
    "tests/test_refresh.py",
    "tests/test_tokens.py",
    "tests/test_ratelimit.py",
    "tests/test_endpoints.py",
    "tests/test_model.py",
]
PROCESS_TESTS = ["tests/test_crash.py", "tests/test_multiprocess.py", "tests/test_shutdown.py"]
PYTEST = ["-m", "pytest", "-x", "-q", "-m", "not evidence", "-p", "no:cacheprovider"]
FAILED = re.compile(r"^(?:FAILED|ERROR) (tests/\S+.*)$", re.MULTILINE)  # the summary line, not a captured log


@dataclass
class Verdict:
    """What the test suite made of one planted bug."""

    patch: str
    caught: bool
    first_failure: str | None
    seconds: float
    note: str = ""


def test_order(root: Path) -> list[str]:
    """The guarantee tests first, then every other test file, each named once (pytest keeps this order)."""
    first = [t for t in GUARANTEE_TESTS if (root / t).is_file()]
    first += sorted(str(p.relative_to(root)) for p in root.glob("tests/test_mutants_*.py"))
    first += [t for t in PROCESS_TESTS if (root / t).is_file()]
    rest = sorted(str(p.relative_to(root)) for p in root.glob("tests/test_*.py"))
    return first + [t for t in rest if t not in first]


def copy_repo(dest: Path) -> None:
    """Tracked files plus new files not yet committed (never .venv, var/ or anything else git ignores)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def apply(patch: Path, tree: Path) -> str | None:
    """Apply the patch; None when it applied, else why not (the patch needs refreshing for the new code)."""
    done = subprocess.run(["git", "apply", str(patch)], cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    fuzzy = subprocess.run(["patch", "-p1", "--fuzz=2", "--no-backup-if-mismatch", "-i", str(patch)],
                           cwd=tree, capture_output=True, text=True, check=False)
    return None if fuzzy.returncode == 0 else f"does not apply: {done.stderr.strip().splitlines()[0]}"


def judge(patch: Path | None, timeout: float) -> Verdict:
    """One planted bug in a fresh copy (None: the clean copy): caught when pytest reports a failure (status 1)."""
    started = time.monotonic()
    name = patch.stem if patch else "baseline (no bug planted)"
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        tree = Path(tmp)
        copy_repo(tree)
        problem = apply(patch, tree) if patch else None
        if problem is not None:
            return Verdict(name, False, None, 0.0, problem)
        env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy's amo_gateway, also in spawned gateways
        try:
            run = subprocess.run([sys.executable, *PYTEST, *test_order(tree)], cwd=tree, env=env,
                                 capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Verdict(name, False, None, time.monotonic() - started, f"no verdict in {timeout:.0f} s")
    failed = FAILED.search(run.stdout)
    note = "" if run.returncode in (0, 1) else f"pytest exit status {run.returncode}: {run.stdout[-300:]}"
    return Verdict(name, run.returncode == 1, failed.group(1)[:300] if failed else None,
                   time.monotonic() - started, note)


def report_line(verdict: Verdict, *, baseline: bool = False) -> str:
    """One line per run: the verdict, the time, the first failing test and its message."""
    if baseline:
        mark = "passes    " if not verdict.caught and not verdict.note else "BROKEN    "
    else:
        mark = "caught    " if verdict.caught else "NOT CAUGHT"
    return f"{mark} {verdict.patch:<40} {verdict.seconds:6.1f} s  {verdict.first_failure or verdict.note}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="patch number prefixes to run, e.g. 03 07")
    parser.add_argument("--report", type=Path, help="also write the verdicts as JSON here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per patch")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run on the clean copy (which shows a failure is the bug's, not a flake)")
    args = parser.parse_args()
    patches = [p for p in sorted(PLANTED.glob("*.patch")) if not args.only or p.name[:2] in args.only]
    if not args.no_baseline:
        clean = judge(None, args.timeout)
        print(report_line(clean, baseline=True), flush=True)
        if clean.caught or clean.note:
            print("the suite fails without any planted bug: fix that first, no verdict would mean anything")
            return 2
    verdicts = []
    for patch in patches:
        verdict = judge(patch, args.timeout)
        verdicts.append(verdict)
        print(report_line(verdict), flush=True)
    missed = [v.patch for v in verdicts if not v.caught]
    print(f"planted bugs caught: {len(verdicts) - len(missed)} of {len(verdicts)}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps([asdict(v) for v in verdicts], indent=2) + "\n", encoding="utf-8")
    return 1 if missed or not verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
