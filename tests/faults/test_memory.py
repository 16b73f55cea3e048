"""Memory pressure: partitions of very dense blocks (two-voxel supervoxels, ~1-2 MB DVID
blocks, 10^5 labels each, at scale 0 and the coarse scale) on a worker whose memory limit is
low for them. Wanted: the partitions complete, the worker is never killed by its nanny, and
the export verifies exact.

Why it once failed: a task held its whole partition's rows (plus ~4x that in intermediates)
until the one atomic write. Measured: 32 dense blocks (~75 MB of rows) got a 512 MiB worker
(numba alone costs ~180 MiB of it) killed on every attempt until the partition was reported
as KilledWorker; with the transform in groups but without spilling, this test's 64 blocks
left the 640 MiB worker paused above Dask's 80 % threshold until the timeout. Now the
transform works in groups of ``GROUP_BYTES`` repacked bytes, spills the rows past
``SPILL_BYTES`` to the worker's local directory (``dvidetl.export.spill``) and hands freed memory
back after the partition, so a task's working set is one group whatever the partition's size.
"""

from __future__ import annotations

import os

import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source

from ._support import verify_and_record

#: 64 dense blocks at scale 0 (~150 MB of output rows) and 8 at scale 1, one partition each
DENSE = "size=512,256,128&scales=2&seed=4&dense=1&mask=full"
LIMIT = "640MiB"


@pytest.mark.timeout(300)  # a worker paused for good (memory never freed) hangs the run
def test_dense_partition_on_low_memory_worker(tmp_path, nodeid, capsys):
    import dask
    from distributed import Client, LocalCluster

    src = open_source(f"synthetic://mem?{DENSE}")
    sink = f"parquet://{tmp_path}/out"
    try:
        # a task is given up after 2 worker deaths (default 4): a kill loop shows, faster
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
                start_server(src) as srv, LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, memory_limit=LIMIT,
            dashboard_address=":0",
        ) as c, Client(c) as dc:
            pid = list(dc.run(os.getpid).values())
            rc = cli(["run", "--uuid", "mem", "--flight", srv.location, "--sink", sink,
                      "--cluster", c.scheduler_address, "--quiet", "--retries", "1",
                      "--partition-blocks", "1024", "--no-indices", "--no-mapping"])
            err = capsys.readouterr().err
            restarted = list(dc.run(os.getpid).values()) != pid
            spill_left = dc.run(lambda dask_worker: os.listdir(
                os.path.join(dask_worker.local_directory, "dvidetl-spill"))
                if os.path.isdir(os.path.join(dask_worker.local_directory, "dvidetl-spill")) else [])
            o = verify_and_record(nodeid, f"memory pressure: 64 dense blocks, {LIMIT} worker",
                                  location=srv.location, uuid="mem", sink_url=sink, runs=1)
    finally:
        src.close()
    assert not restarted, "the nanny killed the worker (memory limit)"
    assert rc == 0, err
    assert o.exact, o.report.text()
    assert o.found == 72
    assert not any(spill_left.values()), f"spill files left behind: {spill_left}"
