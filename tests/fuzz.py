"""Mutation fuzzing of the block codec: ``python -m tests.fuzz`` (``make fuzz``; part of
``make test``).

Targets: ``unwrap`` (gzip, lz4, zstd, dvid), ``decode_block``, ``label_voxel_counts``,
``split_block`` (+ ``join_block``), ``repack`` and ``cseg.encode_chunks`` (in batches, with
random labels lists and chunk shapes), and ``cseg.decode_chunk`` on what it encoded and on
damaged copies. Contract checked for every
input: the call returns, or raises ``BlockFormatError`` / ``ValueError`` (the codec's
documented errors) — never another exception, a crash, a hang (a watchdog dumps the stack
and fails) or an out-of-bounds read: the numba kernels run in a child process compiled with
``NUMBA_BOUNDSCHECK=1``, where an OOB index raises ``IndexError`` instead of reading
garbage. Beyond "no crash" the targets must agree with each other (a block that decodes also
counts, splits and re-joins to the same bytes, sums to its voxel count, and ``repack``
rejects exactly the blocks ``label_voxel_counts`` rejects, with the same reason, and so does
``encode_chunks``, whose background flag must agree with the decoded voxels).

Why mutation-based and not coverage-guided (atheris): the codec's malformed-input space is
structural (header fields, table lengths, palette sizes, packed values, wrappers), so
mutating real DVID blocks (../shared/data: Go's encoder, a /blocks stream, the male-CNS
export-shards file) and small synthetic blocks with every bit width reaches it directly, and
a few hundred thousand inputs fit in CI's minutes without a fuzzing toolchain.

Options: ``--inputs N`` (default 200,000), ``--seed S``, ``--no-boundscheck`` (run in this
process, without the bounds-checked build), ``--timeout S`` (watchdog per batch).
Failing inputs are written to ``.fuzz-failures/`` (and the run exits 1).
"""

from __future__ import annotations

import argparse
import faulthandler
import gzip
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dvidetl.testing.blocks import pack_block

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CODECS = ("gzip", "lz4", "zstd", "dvid")
BATCH = 500  # inputs per repack call / watchdog period


# ---------------------------------------------------------------------------------- seeds ---


def seeds(rng: np.random.Generator) -> tuple[list[bytes], list[bytes]]:
    """(small raw blocks, large raw blocks): real DVID bytes and synthetic ones."""
    from dvidetl.codec import encode_block

    small: list[bytes] = []
    large: list[bytes] = []
    for k in (0, 1, 2, 3, 5, 9, 17, 40, 200, 512):  # palette sizes: every bit width 0..9
        table = rng.integers(0, 2**63, max(k, 1) + 3, dtype=np.uint64)
        subs = [(list(rng.integers(0, len(table), k)), rng.integers(0, max(k, 1), 512))]
        small.append(pack_block((1, 1, 1), table, subs))
    subs = [(list(rng.integers(0, 600, k)), rng.integers(0, max(k, 1), 512))
            for k in (0, 1, 2, 3, 5, 9, 17, 40, 200, 512)]
    small.append(pack_block((5, 2, 1), rng.integers(0, 2**63, 600, dtype=np.uint64), subs))
    for shape, nlab in (((8, 8, 8), 1), ((8, 8, 8), 3), ((16, 16, 16), 7), ((16, 8, 24), 40),
                        ((16, 16, 16), 300), ((8, 16, 16), 2)):
        vol = rng.integers(0, nlab, shape).astype(np.uint64) * np.uint64(2**40 + 3)
        small.append(encode_block(vol))
    small.append(encode_block(np.full((8, 8, 8), 7, np.uint64)))
    try:
        import pyarrow.ipc as ipc

        large.append(gzip.decompress(
            (SHARED_DATA / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes()))
        stream = (SHARED_DATA / "dvid" / "stream_1block.dat").read_bytes()
        n = int(np.frombuffer(stream[12:16], "<i4")[0])
        large.append(gzip.decompress(stream[16:16 + n]))
        import zstandard

        with open(SHARED_DATA / "mcns-shard" / "30720_24576_28672.arrow", "rb") as f:
            t = ipc.open_stream(f).read_all()
        blobs = t.column("dvid_compressed_block").to_pylist()
        blobs.sort(key=len)
        d = zstandard.ZstdDecompressor()
        for b in blobs[:6] + blobs[len(blobs) // 2:len(blobs) // 2 + 2] + blobs[-2:]:
            raw = d.decompress(b)
            (small if len(raw) < 20_000 else large).append(raw)
    except OSError as exc:  # the data is beside the project in CI; say so if it is not
        print(f"fuzz: real DVID seeds not found ({exc}); synthetic seeds only", file=sys.stderr)
    return small, large


# ------------------------------------------------------------------------------ mutators ---


def mutate(raw: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    """One structural or byte-level mutation of a raw block."""
    b = bytearray(raw)
    n = len(b)
    op = int(rng.integers(0, 11))
    if op == 0 and n:  # flip a few bytes anywhere
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(0, n))] ^= int(rng.integers(1, 256))
    elif op == 1:  # truncate
        return bytes(b[: int(rng.integers(0, n + 1))])
    elif op == 2:  # extend (trailing garbage / zero padding)
        tail = rng.bytes(int(rng.integers(1, 64))) if rng.random() < 0.5 else bytes(8)
        return bytes(b) + tail
    elif op == 3 and n >= 16:  # header fields: grid or N
        i = int(rng.integers(0, 4))
        v = int(rng.choice([0, 1, 2, 7, 8, 16, 255, 1 << 16, (1 << 32) - 1,
                            int.from_bytes(b[4 * i:4 * i + 4], "little") + int(rng.integers(-3, 4))]))
        b[4 * i:4 * i + 4] = (v % (1 << 32)).to_bytes(4, "little")
    elif op in (4, 5) and n >= 16:  # a palette size (Ns) or a palette index
        nn = int.from_bytes(b[12:16], "little")
        nsb = int(np.prod(np.frombuffer(bytes(b[:12]), "<u4").astype(np.int64)))
        base = 16 + 8 * nn
        if op == 4 and nsb > 0 and base + 2 * nsb <= n:
            k = base + 2 * int(rng.integers(0, nsb))
            v = int(rng.choice([0, 1, 2, 3, 4, 5, 255, 256, 257, 511, 512, 513, 65535]))
            b[k:k + 2] = v.to_bytes(2, "little")
        elif op == 5 and nsb > 0 and base + 2 * nsb + 4 <= n:
            p0 = base + 2 * nsb
            k = p0 + 4 * int(rng.integers(0, max(1, (n - p0) // 4)))
            if k + 4 <= n:
                v = int(rng.choice([nn, nn + 1, nn - 1 if nn else 0, (1 << 32) - 1, 0]))
                b[k:k + 4] = (v % (1 << 32)).to_bytes(4, "little")
    elif op == 6 and n > 16:  # packed values: random run
        k = int(rng.integers(16, n))
        m = min(int(rng.integers(1, 32)), n - k)
        b[k:k + m] = rng.bytes(m)
    elif op == 7:  # splice with another block
        cut = int(rng.integers(0, n + 1))
        return bytes(b[:cut]) + other[int(rng.integers(0, len(other) + 1)):]
    elif op == 8:  # random bytes, sometimes behind a plausible header
        r = rng.bytes(int(rng.integers(0, 256)))
        return (bytes(b[:16]) + r) if rng.random() < 0.5 else r
    elif op == 9 and n > 24:  # delete or duplicate a range (shifts everything after)
        i, j = sorted(int(v) for v in rng.integers(16, n, 2))
        return bytes(b[:i] + b[j:]) if rng.random() < 0.5 else bytes(b[:j] + b[i:j] + b[j:])
    elif op == 10 and n >= 16:  # zero the whole label table / body
        return bytes(b[:16]) + bytes(n - 16)
    return bytes(b)


def mutate_wrapped(wrapped: bytes, rng: np.random.Generator) -> bytes:
    """A mutation of a stored (wrapped) value: header bytes, stream bytes, length."""
    b = bytearray(wrapped)
    n = len(b)
    op = int(rng.integers(0, 4))
    if op == 0 and n:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, min(n, 16)))] ^= int(rng.integers(1, 256))
    elif op == 1 and n:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, n))] ^= int(rng.integers(1, 256))
    elif op == 2:
        return bytes(b[: int(rng.integers(0, n + 1))])
    else:
        return bytes(b) + (bytes(int(rng.integers(1, 16))) if rng.random() < 0.5 else rng.bytes(9))
    return bytes(b)


# -------------------------------------------------------------------------------- checks ---


class Failure(Exception):
    pass


def check_raw(data: bytes) -> str | None:
    """All raw-block targets on one input; returns the error reason (or None if valid)."""
    from dvidetl.codec import (
        BlockFormatError,
        block_labels,
        decode_block,
        join_block,
        label_voxel_counts,
        split_block,
    )

    try:
        counts = label_voxel_counts(data)
    except BlockFormatError as exc:
        reason = str(exc)
        try:
            decode_block(data)
        except BlockFormatError:
            pass
        else:
            raise Failure("decode_block accepted a block label_voxel_counts rejects") from None
    else:
        reason = None
        labels = block_labels(data)
        if counts.shape != labels.shape:
            raise Failure(f"counts {counts.shape} vs labels {labels.shape}")
        gx, gy, gz = np.frombuffer(data[:12], "<u4").astype(np.int64)
        if int(counts.sum(dtype=np.int64)) > 512 * gx * gy * gz:
            raise Failure("more voxels counted than the block holds")
        if 512 * gx * gy * gz <= (1 << 21):
            try:
                vol = decode_block(data)
            except BlockFormatError as exc:
                raise Failure(f"decode_block rejects a block that counts: {exc}") from None
            if vol.shape != (8 * gz, 8 * gy, 8 * gx):
                raise Failure(f"decoded shape {vol.shape}")
    try:
        lab, body = split_block(data)
    except BlockFormatError:
        pass
    else:
        if join_block(lab, body) != bytes(data):
            raise Failure("join_block(split_block(b)) != b")
    return reason


def check_cseg(batch: list[bytes], reasons: list, rng: np.random.Generator, fail) -> None:
    """``encode_chunks`` over the batch with random labels (usually aligned with the table)
    and random chunk shapes: it accepts exactly the valid blocks (rejects the others with the
    block codec's reason), and a valid small block's background flag is what its decoded,
    mapped, clipped voxels say."""
    from dvidetl.codec import decode_block, join_block, split_block
    from dvidetl.codec.cseg import encode_chunks

    labels, shapes, expect_ok = [], [], []
    for d, why in zip(batch, reasons, strict=True):
        n = int.from_bytes(d[12:16], "little") if len(d) >= 16 else 0
        dims = np.frombuffer(d[:12], "<u4").astype(np.int64) * 8 if len(d) >= 12 else np.ones(3, np.int64)
        k = n if rng.random() < 0.95 else int(rng.integers(0, 4))
        k = min(k, 1 << 16)
        labels.append(rng.integers(0, 4, k).astype(np.uint64) if rng.random() < 0.5
                      else np.arange(k, dtype=np.uint64))
        shp = [int(rng.integers(1, max(2, g + 1))) if rng.random() < 0.5 else int(g) for g in dims]
        if rng.random() < 0.02:
            shp[int(rng.integers(0, 3))] = int(rng.choice([0, -5, 10**6]))
        shapes.append(shp)
        expect_ok.append(why is None and k == n and all(1 <= a <= b for a, b in zip(shp, dims, strict=True)))
    try:
        out = encode_chunks(batch, labels, shapes)
    except Exception as exc:  # noqa: BLE001
        for d in batch:
            fail(d, "cseg-batch", f"{type(exc).__name__}: {exc}")
        return
    for r, (d, why) in enumerate(zip(batch, reasons, strict=True)):
        if why == "?":
            continue
        got = out.errors[r]
        if expect_ok[r] != (got is None):
            fail(d, "cseg", f"encode_chunks says {got!r}; block {why!r}, shape {shapes[r]}")
        elif why is not None and got.startswith("block:") and got != why:
            fail(d, "cseg", f"encode_chunks says {got!r}, label_voxel_counts {why!r}")
        elif got is None:
            w = np.frombuffer(out[r], "<u4")
            nb = int(np.prod([-(-a // 8) for a in shapes[r]]))
            if w.shape[0] < 1 + 2 * nb or w[0] != 1:
                fail(d, "cseg", f"chunk of {w.shape[0]} words for {nb} blocks")
            elif np.prod(shapes[r]) <= (1 << 18):
                _lab, body = split_block(d)
                vol = decode_block(join_block(labels[r], body))
                x, y, z = shapes[r]
                if bool(out.background[r]) != (not vol[:z, :y, :x].any()):
                    fail(d, "cseg", f"background flag {bool(out.background[r])} is wrong")
                check_cseg_decode(d, out[r], shapes[r], vol[:z, :y, :x], rng, fail)


def check_cseg_decode(d: bytes, chunk: bytes, shape, want: np.ndarray, rng: np.random.Generator,
                      fail) -> None:
    """``cseg.decode_chunk`` (verify's reader of stored chunks) gives back the encoded
    voxels, and on a damaged copy of the chunk (bytes flipped, cut, or grown) returns or
    raises ``BlockFormatError`` — never reads out of bounds."""
    from dvidetl.codec import BlockFormatError
    from dvidetl.codec.cseg import decode_chunk

    try:
        got = decode_chunk(chunk, shape)
    except Exception as exc:  # noqa: BLE001
        fail(d, "cseg-decode", f"{type(exc).__name__}: {exc}")
        return
    if not np.array_equal(got, want):
        fail(d, "cseg-decode", f"decode_chunk differs from the block's voxels in {int((got != want).sum())} voxels")
    bad = bytearray(chunk)
    how = rng.integers(0, 3)
    if how == 0 and bad:
        for _ in range(int(rng.integers(1, 4))):
            bad[int(rng.integers(0, len(bad)))] = int(rng.integers(0, 256))
    elif how == 1:
        bad = bad[: int(rng.integers(0, len(bad) + 1)) // 4 * 4]
    else:
        bad += bytes(4 * int(rng.integers(1, 4)))
    try:
        decode_chunk(bytes(bad), shape)
    except BlockFormatError:
        pass
    except Exception as exc:  # noqa: BLE001
        fail(d, "cseg-decode", f"damaged chunk: {type(exc).__name__}: {exc}")


def run(n_inputs: int, seed: int, timeout: float) -> int:
    import pyarrow as pa

    from dvidetl.codec import BlockFormatError, repack, unwrap, wrap

    rng = np.random.default_rng(seed)
    small, large = seeds(rng)
    every = small + large
    out = ROOT / ".fuzz-failures"
    done = n_err = 0
    failures = 0
    t0 = time.perf_counter()
    stats = {"raw": 0, "wrapped": 0, "valid": 0}

    def fail(data: bytes, what: str, why: str) -> None:
        nonlocal failures
        failures += 1
        out.mkdir(exist_ok=True)
        name = out / f"{what}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
        name.write_bytes(data)
        print(f"FUZZ FAILURE ({what}): {why} — input saved to {name}", file=sys.stderr)

    while done < n_inputs:
        faulthandler.dump_traceback_later(timeout, exit=True)  # a hang fails with a stack
        batch: list[bytes] = []
        reasons: list[str | None] = []
        codec = CODECS[int(rng.integers(0, len(CODECS)))]
        for _ in range(min(BATCH, n_inputs - done)):
            pool = large if (large and rng.random() < 0.01) else small
            base = pool[int(rng.integers(0, len(pool)))]
            other = every[int(rng.integers(0, len(every)))]
            data = mutate(base, rng, other)
            if rng.random() < 0.1:
                data = mutate(data, rng, other)
            if rng.random() < 0.25:  # through a storage wrapper: unwrap is a target too
                stats["wrapped"] += 1
                wrapped = mutate_wrapped(wrap(data, codec), rng) if rng.random() < 0.5 \
                    else wrap(data, codec)
                try:
                    data = unwrap(wrapped, codec)
                except BlockFormatError:
                    done += 1
                    continue
                except Exception as exc:  # noqa: BLE001 — the finding
                    fail(wrapped, f"unwrap-{codec}", f"{type(exc).__name__}: {exc}")
                    done += 1
                    continue
            stats["raw"] += 1
            try:
                r = check_raw(data)
            except Failure as exc:
                fail(data, "consistency", str(exc))
                r = "?"
            except ValueError as exc:  # documented (BlockFormatError is one)
                r = str(exc)
            except Exception as exc:  # noqa: BLE001 — IndexError under boundscheck, etc.
                fail(data, "raw", f"{type(exc).__name__}: {exc}")
                r = "?"
            batch.append(data)
            reasons.append(r)
            done += 1
            n_err += r is not None
            stats["valid"] += r is None
        if batch:
            try:
                rp = repack(pa.array(batch, pa.binary()), "none")
            except Exception as exc:  # noqa: BLE001
                for d in batch:
                    fail(d, "repack-batch", f"{type(exc).__name__}: {exc}")
            else:
                errs = rp.errors.to_pylist()
                for d, want, got in zip(batch, reasons, errs, strict=True):
                    if want == "?":
                        continue
                    if (want is None) != (got is None) or (want and got and want != got):
                        fail(d, "repack", f"repack says {got!r}, label_voxel_counts {want!r}")
            check_cseg(batch, reasons, rng, fail)
        faulthandler.cancel_dump_traceback_later()
    dt = time.perf_counter() - t0
    print(f"fuzz: {done:,} inputs ({stats['wrapped']:,} through unwrap, {stats['raw']:,} raw "
          f"blocks: {stats['valid']:,} valid, {n_err:,} rejected) in {dt:.1f} s, "
          f"{len(small) + len(large)} seeds, NUMBA_BOUNDSCHECK={os.environ.get('NUMBA_BOUNDSCHECK', '0')}"
          f": {'OK' if not failures else f'{failures} FAILURES'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per batch before a hang")
    p.add_argument("--no-boundscheck", action="store_true",
                   help="run here without the bounds-checked numba build")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    if a.no_boundscheck or os.environ.get("NUMBA_BOUNDSCHECK") == "1":
        print(f"fuzz: seed {seed}", flush=True)
        return run(a.inputs, seed, a.timeout)
    # the bounds-checked build has its own numba cache (shared with tests/test_codec_bad.py)
    cache = ROOT / ".pytest_cache" / "d" / "numba-boundscheck"
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "tests.fuzz", "--inputs", str(a.inputs), "--seed", str(seed),
           "--timeout", str(a.timeout)]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
