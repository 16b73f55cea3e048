"""Run every `bench/bench_*.py` (or those named on the command line) and collect results.

Each module exposes `run() -> list[dict]`; a row has at least `name`, `value`, `unit`, and
where there is one `baseline`, `baseline_value` and `ratio` (value / baseline, measured in the
same run, interleaved — this machine is noisy: compare ratios, not absolute times) and
`target` (a human-readable target, not asserted).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    results: dict[str, list[dict]] = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        mod = importlib.import_module(f"bench.{name}")
        rows = mod.run()
        results[name] = rows
        print(f"{'benchmark':44} {'value':>12} {'unit':10} {'baseline':>12} {'ratio':>7}  target")
        for r in rows:
            print(
                f"{r['name'][:44]:44} {_fmt(r.get('value')):>12} {r.get('unit', ''):10} "
                f"{_fmt(r.get('baseline_value')):>12} {_fmt(r.get('ratio')):>7}  {r.get('target', '')}"
            )
        print(f"   ({time.perf_counter() - t0:.1f} s)\n", flush=True)
    out = HERE / "results.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    old.update(results)
    out.write_text(json.dumps(old, indent=2, sort_keys=True))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
