"""The mutation gate: mutmut over the modules that carry the guarantees, kill rate per module, target enforced.

Runs `mutmut run` (configured in pyproject.toml's [tool.mutmut]: which modules, which fast tests), then reads
`mutmut results --all true` and prints, per module, how many mutants the tests killed. A mutant counts as
killed when a test failed, timed out or crashed on it; a survivor or a mutant no test reaches counts
against the rate. The exit status is non-zero when any module stays below the target. mutmut keeps its
results in mutants/: a second run checks new or changed mutants and re-checks those not killed before
(`--fresh` starts over). `mutmut show <name>` prints a survivor's diff.
Usage: python scripts/mutation.py [--max-children 2] [--target 90] [--report out.json] [--no-run] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["vault", "atomic", "store", "manager", "locks", "auth", "ratelimit", "backends.postgres",
           "backends.pg_locks", "backends.pg_rate", "backends.pg_answers", "backends.pg_schema"]
WIDTH = 24  # the module column: "backends.pg_answers.py" and the like
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def run_mutmut(max_children: int, names: list[str] | None = None) -> int:
    """One mutmut run (all pending mutants, or just `names`); mutmut prints its own progress."""
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *(names or [])]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def run_all(max_children: int) -> int:
    """Check new and changed mutants, then re-check every cached one not killed: tests added since may kill it."""
    status = run_mutmut(max_children)
    if status != 0:
        return status
    again = sorted(name for name, state in statuses().items() if state not in KILLED)
    return run_mutmut(max_children, again) if again else 0


def stop_left_servers(pg_dir: Path) -> int:
    """Stop the throwaway PostgreSQL servers (tests/pg.py) of test runs mutmut killed on a timeout.

    A killed pytest never reaches its fixture's teardown, so its server would run on; every test server of
    this run lives under `pg_dir` (AMO_TEST_PG_DIR), and nothing else does. Returns how many were stopped.
    """
    stopped = 0
    for pid_file in pg_dir.glob("*/data/postmaster.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
        except (OSError, ValueError, IndexError):
            continue
        for _ in range(100):
            if not pid_file.exists():
                break
            time.sleep(0.1)
        stopped += 1
    shutil.rmtree(pg_dir, ignore_errors=True)
    return stopped


def statuses() -> dict[str, str]:
    """Every mutant's name and status, as `mutmut results --all true` lists them."""
    listed = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    pairs = (line.strip().rsplit(": ", 1) for line in listed.splitlines() if "__mutmut_" in line)
    return {name: status for name, status in pairs}


def module_of(mutant: str) -> str:
    """`amo_gateway.vault.xǁVaultǁsave__mutmut_3` belongs to vault, `amo_gateway.backends.pg_rate.x…` to
    backends.pg_rate: the dotted path between the package and the mutated function's name."""
    return mutant.rsplit(".", 1)[0].removeprefix("amo_gateway.")


def tally(found: dict[str, str]) -> dict[str, Counter[str]]:
    """Status counts per module."""
    counts: dict[str, Counter[str]] = {m: Counter() for m in MODULES}
    for name, status in found.items():
        counts.setdefault(module_of(name), Counter())[status] += 1
    return counts


def rate(counts: Counter[str]) -> float:
    """Per cent of mutants killed (100 for a module without mutants)."""
    total = sum(counts.values())
    return 100.0 * sum(counts[s] for s in KILLED) / total if total else 100.0


def print_table(counts: dict[str, Counter[str]], target: float) -> list[str]:
    """One line per module; returns the modules below the target."""
    print(f"{'module':<{WIDTH}}{'mutants':>8}{'killed':>8}{'survived':>9}{'no tests':>9}{'other':>7}{'kill rate':>11}")
    below = []
    for module, c in counts.items():
        killed = sum(c[s] for s in KILLED)
        other = sum(c.values()) - killed - c["survived"] - c["no tests"]
        flag = "" if rate(c) >= target else f"  < {target:g}%"
        below += [module] if flag else []
        print(f"{module + '.py':<{WIDTH}}{sum(c.values()):>8}{killed:>8}{c['survived']:>9}{c['no tests']:>9}{other:>7}"
              f"{rate(c):>10.1f}%{flag}")
    overall: Counter[str] = sum(counts.values(), Counter())
    print(f"{'all':<{WIDTH}}{sum(overall.values()):>8}{sum(overall[s] for s in KILLED):>8}{overall['survived']:>9}"
          f"{overall['no tests']:>9}{'':>7}{rate(overall):>10.1f}%")
    return below


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    parser.add_argument("--target", type=float, default=90.0, help="minimum kill rate per module, in per cent")
    parser.add_argument("--report", type=Path, help="also write the counts and survivors as JSON here")
    parser.add_argument("--no-run", action="store_true", help="only report the results of the last run")
    parser.add_argument("--fresh", action="store_true", help="forget mutmut's cached results (mutants/) first")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not args.no_run:
        pg_dir = Path(tempfile.mkdtemp(prefix="amo-mutation-pg-"))
        pg_dir.chmod(0o711)  # the servers run as `nobody` under root (tests/pg.py): they must reach their dirs
        os.environ["AMO_TEST_PG_DIR"] = str(pg_dir)
        try:
            status = run_all(args.max_children)
        finally:
            left = stop_left_servers(pg_dir)
        if left:
            print(f"stopped {left} test PostgreSQL server(s) left by killed test runs")
        if status != 0:
            print("mutmut run failed (see above)", file=sys.stderr)
            return 2
    found = statuses()
    counts = tally(found)
    below = print_table(counts, args.target)
    survivors = sorted(n for n, s in found.items() if s not in KILLED)
    print("not killed (mutmut show <name>):", *survivors, sep="\n  ")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        data = {"counts": {m: dict(c) for m, c in counts.items()}, "rates": {m: rate(c) for m, c in counts.items()},
                "not_killed": {n: found[n] for n in survivors}}
        args.report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if below:
        print(f"kill rate below {args.target:g}% in: {', '.join(below)}", file=sys.stderr)
    return 1 if below or not found else 0


if __name__ == "__main__":
    sys.exit(main())
