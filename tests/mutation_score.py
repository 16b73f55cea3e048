"""`make mutants` score: killed / survived / untested mutants per module, from mutmut's
result files (``mutants/<module>.py.meta``), and the survivors' names.

Why our own table: ``mutmut results`` lists survivors but no per-module score, and the target
(>= 90 % killed on each mutated module) is per module. A timeout counts as killed, as
mutmut counts it (the mutant made the tests hang or run away); "no tests" means no selected test
ran the mutated function and counts against the score. Timeouts are shown apart: before
mutmut ran mutants from a clean fork server, a forked child hung in gRPC and every such
"timeout" was a false kill.

Survivors judged equivalent (no test can tell them from the original: the reason is written
next to each name in ``tests/mutants_equivalent.txt``) are shown apart and left out of the
score's denominator; every other survivor counts against it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

KILLED = {1, 3, 37}
TIMEOUT = {36, 24, -24, 152, 255}
SURVIVED = {0}
UNCHECKED = {None, 2}


EQUIVALENT = Path(__file__).with_name("mutants_equivalent.txt")


def equivalent_names(path: Path = EQUIVALENT) -> set[str]:
    """Mutant names judged equivalent (first word of each line; ``#`` starts a comment)."""
    if not path.exists():
        return set()
    return {ln.split()[0] for ln in path.read_text().splitlines() if ln.split() and not ln.startswith("#")}


def main(argv: list[str] | None = None) -> int:
    root = Path("mutants")
    equiv = equivalent_names()
    metas = sorted(root.rglob("*.py.meta")) if root.is_dir() else []
    if not metas:
        print("no mutmut results (run `make mutants`)")
        return 1
    print(f"{'module':<28} {'killed':>7} {'timeout':>7} {'survived':>8} {'equiv':>6} {'no test':>8} "
          f"{'unchecked':>9} {'score':>7}")
    survivors = []
    for meta in metas:
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if not codes:
            continue
        mod = str(meta.relative_to(root))[: -len(".meta")]
        k = sum(c in KILLED for c in codes.values())
        t = sum(c in TIMEOUT for c in codes.values())
        s = [n for n, c in codes.items() if c in SURVIVED and n not in equiv]
        e = sum(c in SURVIVED and n in equiv for n, c in codes.items())
        u = sum(c in UNCHECKED for c in codes.values())
        nt = len(codes) - k - t - len(s) - e - u
        done = k + t + len(s) + nt
        score = f"{100 * (k + t) / done:6.1f}%" if done else "    -"
        print(f"{mod:<28} {k:>7} {t:>7} {len(s):>8} {e:>6} {nt:>8} {u:>9} {score:>7}")
        survivors += s
    if survivors:
        print(f"\n{len(survivors)} survivors (`mutmut show NAME` shows one):")
        for n in survivors:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
