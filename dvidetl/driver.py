"""Planning and the Dask graph of an export run (wiring only: the work is in ``transform``).

Why futures, not ``dask.dataframe.from_map``: every task has a side effect (it commits its
partition and ledger row to the sink) and returns only a small stats dict; nothing is
shuffled or reduced, so a dataframe would add meta inference and graph optimisation for no
gain. With futures the driver streams completions (``distributed.as_completed``) into the
progress line, keeps a bounded window of partitions in flight (a CNS plan has ~10^5
partitions; the scheduler never holds them all), retries each failed task (``retries=``),
and can stop submitting when ``--max-errors`` is reached. Each task gets only small
arguments: the Flight location, the token (wrapped so it never prints), the sink URL, and
one plan entry — workers read their bytes from the Flight server themselves. Tasks are
``pure=False`` with keys derived from the partition, so a resubmitted partition is a new
attempt, never a cached result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dvidetl.sinks.base import Partition, RunInfo
from dvidetl.tasks import TaskContext, export_partition

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    run_id: str
    partitions: int = 0  # in the plan
    done: int = 0  # committed by this invocation
    skipped: int = 0  # already committed (resume / retried after commit)
    failed: list = field(default_factory=list)  # (key, reason)
    blocks: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    raw_bytes: int = 0
    index_rows: int = 0  # label_index rows committed (this invocation and earlier ones)
    mapping_rows: int = 0
    seconds: float = 0.0
    aborted: str | None = None
    #: raw_bytes misses partitions committed by a dvidetl whose ledger had no raw_bytes
    raw_partial: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and self.errors == 0 and self.aborted is None


def result_dict(res: RunResult) -> dict:
    """The figures of a ``RunResult`` for the run's record (failed partitions: the count and
    the first ten, with reasons)."""
    from dataclasses import asdict

    d = asdict(res)
    d["failed"] = len(res.failed)
    d["failed_partitions"] = [{"partition": k, "reason": r} for k, r in res.failed[:10]]
    d["ok"] = res.ok
    return d


def ledger_totals(ledger) -> dict:
    """A run's totals from its ledger rows (what the partitions committed so far did): the
    same figures ``execute`` adds up from the tasks, so a resumed run reports what an
    uninterrupted one does."""
    import pyarrow.compute as pc

    def total(col: str, kind: str | None = "blocks") -> int:
        c = ledger.column(col)
        if kind is not None:
            c = pc.filter(c, pc.equal(ledger.column("kind"), kind))
        return int(pc.sum(c).as_py() or 0)

    isb = pc.equal(ledger.column("kind"), "blocks")
    raw = pc.filter(ledger.column("raw_bytes"), isb)
    return {"blocks": total("blocks"), "errors": total("errors", None), "bytes_in": total("bytes_in"),
            "bytes_out": total("bytes_out"), "raw_bytes": int(pc.sum(raw).as_py() or 0),
            "index_rows": total("rows", "indices"), "mapping_rows": total("rows", "mapping"),
            "raw_partial": bool(raw.null_count)}


def _interleaved(todo: list[Partition]) -> list[Partition]:
    """Blocks in plan order with the indices and mapping partitions spread evenly among
    them (and the first ones early), so that all kinds run on all workers side by side
    and no kind is left as a long tail at the end."""
    blocks = [p for p in todo if p.kind == "blocks"]
    keyed = [p for p in todo if p.kind != "blocks"]
    if not blocks or not keyed:
        return keyed + blocks
    # position of each keyed partition among the blocks: evenly over the first half of the run
    pos = (np.arange(len(keyed)) * (len(blocks) / 2 / len(keyed))).astype(np.int64)
    out: list[Partition] = []
    k = 0
    for i, b in enumerate(blocks):
        while k < len(keyed) and pos[k] <= i:
            out.append(keyed[k])
            k += 1
        out.append(b)
    out.extend(keyed[k:])
    return out


def execute(
    client,
    run: RunInfo,
    ctx: TaskContext,
    sink,
    *,
    progress=None,
    retries: int = 3,
    max_errors: int | None = None,
    window: int | None = None,
    dashboard=None,
) -> RunResult:
    """Submit every not-yet-committed partition of ``run`` (bounded window), follow
    completions, and return totals. Partitions already in the ledger are skipped."""
    from distributed import as_completed

    t0 = time.perf_counter()
    res = RunResult(run.run_id, partitions=len(run.partitions))
    done_keys = sink.done(run.run_id)
    todo = [p for p in run.partitions if p.key not in done_keys]
    todo = _interleaved(todo)
    res.skipped = len(run.partitions) - len(todo)
    if res.skipped:
        for name, v in ledger_totals(sink.ledger(run.run_id)).items():
            setattr(res, name, (getattr(res, name) or v) if name == "raw_partial" else getattr(res, name) + v)
    if dashboard is not None:
        dashboard.skipped([p for p in run.partitions if p.key in done_keys])
        dashboard.publish(res, force=True)
    if progress is not None:
        progress.start(total_blocks=sum(p.blocks for p in run.partitions),
                       done_blocks=res.blocks, total_parts=len(run.partitions), done_parts=res.skipped)
    if window is None:
        nthreads = sum(client.nthreads().values()) or 1
        window = max(8, 4 * nthreads)
    ctx_f = ctx
    pending = iter(todo)
    ac = as_completed()
    futs = {}

    def submit_next() -> bool:
        p = next(pending, None)
        if p is None:
            return False
        f = client.submit(export_partition, ctx_f, p, key=f"export-{run.run_id}-{p.key}-{os.urandom(2).hex()}",
                          retries=retries, pure=False)
        futs[f.key] = p
        ac.add(f)
        return True

    for _ in range(window):
        if not submit_next():
            break
    stop = False
    for fut in ac:
        part = futs.pop(fut.key)
        try:
            st = fut.result()
        except Exception as exc:  # noqa: BLE001 — a failed partition is reported, not fatal
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            res.failed.append((part.key, reason))
            log.error("partition %s failed after %d retries: %s", part.key, retries, reason)
            if dashboard is not None:
                dashboard.completed(part, None, res, failure=reason)
        else:
            if st.skipped:
                res.skipped += 1
            else:
                res.done += 1
                if part.kind == "blocks":
                    res.blocks += st.blocks
                    res.bytes_in += st.bytes_in
                    res.bytes_out += st.bytes_out
                    res.raw_bytes += st.raw_bytes
                elif part.kind == "indices":
                    res.index_rows += st.rows
                elif part.kind == "mapping":
                    res.mapping_rows += st.rows
                res.errors += st.errors
            if dashboard is not None:
                dashboard.completed(part, st, res)
        finally:
            fut.release()
        if progress is not None:
            progress.update(part, res)
        if max_errors is not None and res.errors > max_errors and not stop:
            res.aborted = f"more than {max_errors} block errors ({res.errors})"
            stop = True
        if not stop:
            submit_next()
    res.seconds = time.perf_counter() - t0
    if dashboard is not None:
        dashboard.finish(res)
    if progress is not None:
        progress.finish(res)
    return res
