"""Names of a seeded random sample of a module's mutants, for ``make mutants``:

    make mutants MUTANTS_ARGS="$(.venv/bin/python -m tests.mutation_sample 'dvidetl.tables.cells.*' 150)"

Why a sample: the mutated modules have ~8,000 mutants and a mutant's child runs its covering
tests (seconds each on a loaded machine), so a full pass takes many hours; a seeded random
sample of a module's mutants estimates its score without bias (150 of them: about +-5 points)
and names the survivors to kill. The names come from mutmut's result files (``mutants/``, made
by the first ``make mutants``, e.g. with a glob that selects one function). An optional
``--only NAME,NAME`` keeps the mutants of those functions (e.g. a sink's exactly-once methods)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import random
import sys
from pathlib import Path


def mutant_names(root: Path = Path("mutants"), unrun: bool = False) -> list[str]:
    """Every mutant's name; with ``unrun`` only those this checkout has no result for."""
    names: list[str] = []
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        names += [k for k, v in codes.items() if not unrun or v is None]
    return sorted(names)


#: the mutants of the samples recorded since 2026-12-08 (docs/mutation-scores.md), one name
#: per line: ``--fresh`` leaves them out (earlier samples' names were not kept)
SAMPLED = Path(__file__).with_name("mutants_sampled.txt")


def sampled_names(path: Path = SAMPLED) -> set[str]:
    if not path.exists():
        return set()
    return {ln.split()[0] for ln in path.read_text().splitlines() if ln.split() and not ln.startswith("#")}


def function_of(name: str) -> str:
    """``pkg.mod.xǁClassǁmethod__mutmut_3`` -> ``method``; ``pkg.mod.x_func__mutmut_3`` -> ``func``."""
    base = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    return base.split("ǁ")[-1] if "ǁ" in base else base[2:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("glob", help="mutant name glob, e.g. 'dvidetl.tables.cells.*'")
    ap.add_argument("n", type=int, help="sample size (all if fewer)")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--only", default="", help="comma-separated function/method names to keep")
    ap.add_argument("--unrun", action="store_true",
                    help="only mutants not run yet here: a fresh sample, after tests were written for "
                         "an earlier one's survivors (which would score it too well)")
    ap.add_argument("--fresh", action="store_true",
                    help=f"leave out the mutants of earlier recorded samples ({SAMPLED.name}): fresh "
                         "in a new checkout too, where --unrun knows nothing of earlier runs")
    a = ap.parse_args(argv)
    names = [n for n in mutant_names(unrun=a.unrun) if fnmatch.fnmatch(n, a.glob)]
    if a.fresh:
        seen = sampled_names()
        names = [n for n in names if n not in seen]
    if a.only:
        keep = set(a.only.split(","))
        names = [n for n in names if function_of(n) in keep]
    if not names:
        print(f"no mutants match {a.glob!r} (run `make mutants` once to generate them)", file=sys.stderr)
        return 2
    pick = sorted(random.Random(a.seed).sample(names, min(a.n, len(names))))
    print(" ".join(f"'{n}'" for n in pick))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
