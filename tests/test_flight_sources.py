"""The Flight server over the real sources, the `serve` command, and TLS.

What is served must be exactly what the source enumerates in-process (blocks for random
Morton ranges, counts, mapping, indices), for the synthetic labelmap and for a real DVID
export-shards file; `python -m dvidetl serve` is run as a real process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.flight.client import FlightAuthError, FlightClient, FlightUnavailable
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
SYN_URL = "synthetic://flighttest?size=512,384,320&scales=2&seed=5"
TOKEN = "tok-3f9a"


def inproc(src, scale: int, lo: int, hi: int) -> pa.Table:
    """The source's own enumeration of a range (empty table with the wire schema if none)."""
    from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA

    return pa.Table.from_batches(list(src.read_blocks(scale, lo, hi)), schema=BLOCKS_WIRE_SCHEMA)


@pytest.fixture(scope="module")
def syn():
    src = open_source(SYN_URL)
    yield src
    src.close()


@pytest.fixture(scope="module")
def syn_client(syn):
    with start_server(syn, token=TOKEN, max_batch_bytes=256 << 10) as srv:
        c = FlightClient(srv.location, TOKEN)
        yield c
        c.close()


def test_synthetic_whole_volume_every_scale(syn, syn_client):
    info = syn_client.info()
    assert info == syn.info() and info.uuid == "flighttest" and info.codec == syn.info().codec
    for sc in info.scales:
        got = syn_client.read_blocks_table(sc.scale, 0, 2**64)
        want = inproc(syn, sc.scale, 0, sc.morton_end)
        assert got.num_rows > 0 and got.equals(want)
        assert got.schema.metadata[b"codec"] == info.codec.encode()
        cells, counts, exact = syn_client.count(sc.scale, 3)
        wc, wn, we = syn.count(sc.scale, 3)
        np.testing.assert_array_equal(cells, wc)
        np.testing.assert_array_equal(counts, wn)
        assert exact == we
        if exact:
            assert int(counts.sum()) == got.num_rows


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 1), st.floats(0, 1), st.integers(1, 200))
def test_synthetic_random_ranges(syn, syn_client, scale, frac, width):
    end = syn.info().scale(scale).morton_end
    lo = min(int(frac * end), end - 1)
    hi = lo + width
    got = syn_client.read_blocks_table(scale, lo, hi)
    assert got.equals(inproc(syn, scale, lo, min(hi, end)))


def test_synthetic_mapping_and_indices(syn, syn_client):
    mapping = pa.Table.from_batches(list(syn_client.read_mapping()))
    want = pa.Table.from_batches(list(syn.read_mapping()))
    assert mapping.num_rows > 0 and mapping.equals(want)
    svs = mapping.column("supervoxel").to_numpy()
    probe = np.concatenate([svs, svs[:50], np.array([0, 2**63 + 5], np.uint64)])
    np.testing.assert_array_equal(syn_client.map_supervoxels(probe), syn.map_supervoxels(probe))
    np.testing.assert_array_equal(
        syn_client.map_supervoxels(svs)[: len(svs)], mapping.column("body").to_numpy()
    )
    idx = pa.Table.from_batches(list(syn_client.read_indices(0, 2**64)))
    assert idx.num_rows > 0 and idx.equals(pa.Table.from_batches(list(syn.read_indices(0, 2**64))))
    labels = idx.column("label").to_numpy()
    lo, hi = int(labels[3]), int(labels[20])
    part = pa.Table.from_batches(list(syn_client.read_indices(lo, hi)))
    assert part.column("label").to_pylist() == [int(v) for v in labels[3:20]]


# ---------------------------------------------------------------------------------------
# a real DVID export-shards file
# ---------------------------------------------------------------------------------------


def test_real_shard_served_byte_for_byte(tmp_path, shared_data):
    (tmp_path / "s1").mkdir()
    shard = shared_data / "mcns-shard"
    os.symlink(shard / "30720_24576_28672.arrow", tmp_path / "s1" / "30720_24576_28672.arrow")
    os.symlink(shard / "30720_24576_28672-newformat.csv", tmp_path / "s1" / "30720_24576_28672.csv")
    spec = shared_data / "dvid" / "mcns-ng-specs.json"
    src = open_source(f"shards://{tmp_path}?spec={spec}")
    try:
        with start_server(src) as srv:
            c = FlightClient(srv.location, uuid="0123abcd")
            info = c.info()
            assert info.uuid == "0123abcd" and info.codec == "zstd"
            got = c.read_blocks_table(1, 0, 2**64)
            assert got.num_rows == 258
            assert got.equals(inproc(src, 1, 0, info.scale(1).morton_end))
            # the bytes are DVID's own, still zstd-wrapped
            first = got.column("data")[0].as_py()
            assert first[:4] == b"\x28\xb5\x2f\xfd"
            m = pa.Table.from_batches(list(c.read_mapping()))
            assert m.num_rows == 890
    finally:
        src.close()


# ---------------------------------------------------------------------------------------
# the serve command
# ---------------------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvidetl", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_token_and_signals(tmp_path, sig):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    p = _serve(
        "--source",
        "synthetic://cli?size=256,256,128&scales=1",
        "--port",
        "0",
        "--token-file",
        str(tok),
    )
    try:
        loc = p.stdout.readline().strip()
        assert loc.startswith("grpc://127.0.0.1:"), (
            loc,
            p.stderr.read() if p.poll() is not None else "",
        )
        c = FlightClient(loc, TOKEN)
        assert c.info().uuid == "cli"
        assert c.read_blocks_table(0, 0, 2**64).num_rows > 0
        with pytest.raises(FlightAuthError):
            FlightClient(loc, retries=0).info()
        c.close()
        p.send_signal(sig)
        assert p.wait(timeout=30) == 0
        err = p.stderr.read()
        assert TOKEN not in err and "bearer token" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--source", "nosuch://x"], "unknown source URL scheme"),
        (
            ["--source", "synthetic://x", "--token-file", "/nonexistent/tok"],
            "cannot read token file",
        ),
        (["--source", "synthetic://x", "--tls-cert", "/tmp/c.pem"], "--tls-cert and --tls-key"),
        (["--source", "synthetic://x", "--port", "70000"], "not a TCP port"),
    ],
)
def test_serve_command_bad_input_is_one_line(args, needle):
    p = _serve(*args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and needle in lines[0] and lines[0].startswith("dvidetl serve: error:")
    ), err


def test_serve_command_port_in_use(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _serve("--source", "synthetic://x?size=128,128,128&scales=1", "--port", str(port))
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cannot serve on 127.0.0.1:{port}" in lines[0], err


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path, syn):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    with start_server(
        syn, token=TOKEN, tls_certificates=[(cert.read_bytes(), key.read_bytes())]
    ) as srv:
        assert srv.location.startswith("grpc+tls://127.0.0.1:")
        c = FlightClient(srv.location, TOKEN, tls_root_certs=cert.read_bytes())
        assert c.info() == syn.info()
        assert c.read_blocks_table(1, 0, 2**64).equals(
            inproc(syn, 1, 0, syn.info().scale(1).morton_end)
        )
        # a plaintext client cannot talk to it
        plain = FlightClient(srv.location.replace("grpc+tls", "grpc"), TOKEN, retries=0, timeout=5)
        with pytest.raises(FlightUnavailable):
            plain.info()
        c.close()
    _ = time  # keep import used for slow machines' debugging
