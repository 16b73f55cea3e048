"""`dvid+http://host:port[?uuid=U&instance=I]` — a live, unmodified DVID through its HTTP API.

DVID has no Flight endpoint yet, so this source speaks the documented labelmap HTTP API
(dvid-formats §5) and presents it as a `Source`:

* ``uuid=`` is resolved once, before anything else, to the full UUID of the node it names —
  a prefix, ``PREFIX:BRANCH`` (the branch's leaf), ``:BRANCH``, ``PREFIX:BRANCH~N``, by DVID's
  rules (``_dvid_versions``) — and every request reads that node: the lock checked and the
  export's name are that node's; ``info().requested_uuid`` keeps what was asked for.
* ``/info`` gives block size, ``MaxDownresLevel`` and the scale-0 extents (MaxPoint inclusive);
  the scale-s grid is ``ceil((max + 1) / 2^s / block)`` (or the spec's, below). Negative
  coordinates are refused. Blocks are counted, planned and read only inside the extents.
* ``read_blocks(scale, lo, hi)`` covers the Morton range by aligned boxes (an aligned Morton
  range is an aligned box of blocks), each at most ``2^box_bits`` block slots, clipped to the
  extents, fetches each with ``/blocks/<size>/<offset>?compression=blocks&supervoxels=true``
  (a few requests in flight at once), parses the record stream with a numba kernel, sorts by
  Morton and serves the stored gzip of each block unchanged (``codec == "gzip"``).
* DVID cannot count blocks cheaply, so ``count`` answers flagged upper bounds (``exact=False``):
  block slots inside the extents per Morton cell, computed arithmetically per axis;
  ``count_requests`` says how many requests reading any ranges sends (``plan`` shows it).
* ``/mappings?format=binary`` is fetched once and cached as sorted arrays.
* The labels with an index are listed once (``/existing-labels``, keys only; else paged
  ``/listlabels``) and cached: ``count_keys`` plans from them, ``read_indices`` fetches their
  ``/indices-compressed`` in requests of ``index_batch`` labels, ``index_parallel`` in flight
  (default ``parallel``), and unwraps DVID's LZ4 wrapper to the LabelIndex protobuf.

Robustness: explicit timeouts; retries with exponential backoff on connection errors, 5xx and
503 throttling; and because DVID cannot change the status of a streamed 200 response, an error
text appended to the stream (a record header that does not parse, a length running past the
body, trailing bytes, a payload that is not gzip) is detected and reported with the URL and
byte offset — after retrying, since such failures are usually transient on the server side.

URL parameters besides ``uuid``/``instance``: ``timeout`` (s, default 60), ``retries``
(default 6), ``backoff`` (first delay in s, default 0.2), ``box_bits`` (default 12 = 16^3
blocks per request), ``parallel`` (requests in flight, default 4), ``throttle=true`` (ask DVID
to throttle /blocks; its 503s are waited out; ``inflight=N`` after raising DVID's throttle to
N, an admin setting: ``POST /api/server/settings?admintoken=...``), ``minpoint``/``maxpoint``
(``X,Y,Z`` scale-0 voxels, inclusive: override DVID's extents, which are only hints and can be
stale — e.g. after ``ingest-supervoxels`` without ``POST /extents``; blocks outside them are
never read, with or without ``spec=``), ``spec=PATH`` (the neuroglancer multiscale spec
export-shards used: every scale's grid is then ``ceil(size / block)``, so both sources plan
the same Morton codes; still read only inside the extents; default: DVID's extents),
``box_shape=rows|cube`` (ranges of many boxes fetched as whole X rows, default, or as Morton
cubes), ``index_parallel``, ``index_batch`` (labels per ``/indices-compressed`` request,
default 2,000, at most 50,000: DVID refuses more), ``rows_per_label`` (planning estimate of
label_index rows per label, default 64), ``labels=auto|existing|listlabels`` (how labels are
listed), ``token_file`` (the DVID token; else env ``DVIDETL_DVID_TOKEN(_FILE)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa

from dvidetl.batching import spans
from dvidetl.errors import UserError, first_line
from dvidetl.geometry import (
    KEY_END,
    ScaleInfo,
    VolumeInfo,
    _bit_plan,
    axis_bits,
    morton_decode,
    morton_encode,
    vec3,
)
from dvidetl.sources._dvid_parse import (
    _ERRS,
    _binary_array,
    _gather,
    _merge_parts,
    _scan_block_records,
    _unwrap_index,
    parse_mappings,
)
from dvidetl.sources._dvid_transport import (
    DvidAuthError,
    DvidHttpError,
    DvidUnavailable,
    _Http,
    _StreamError,
    dvid_token,
    token_origin,
)
from dvidetl.sources._dvid_versions import DvidNode, resolve_node
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    KeyCounts,
    count_sorted,
    dedupe_pairs,
    drop_background,
    key_slice,
    mapping_batches,
)
from dvidetl.urlquery import Query

# Those in try/if/with blocks are optional or conditional.

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_BLOCKS = 8192
#: labels per /indices-compressed request: DVID serves each with one Get, so a request of
#: 2,000 labels is a few seconds of its time (far from its 600 s response cut) and several
#: such requests keep DVID's Badger busy in parallel
INDICES_PER_REQUEST = 2_000
#: DVID answers a /indices-compressed request of more labels 400 ("only 50,000 label
#: indices can be returned at a time"): ``index_batch`` may not ask for more
DVID_MAX_INDICES = 50_000
#: a range of many boxes is fetched in groups of 2^GROUP_BITS boxes' worth of slots, each
#: group as boxes of whole X rows (``box_shape=rows``)
GROUP_BITS = 4
#: label_index rows assumed per body label when planning (DVID cannot count them cheaply;
#: the mCNS has ~5-7e9 rows over its labels); ``rows_per_label=`` overrides it
ROWS_PER_LABEL = 64
LISTLABELS_PAGE = 100_000
#: cells a count() may return before asking for coarser cells (more ``cell_bits``)
MAX_COUNT_CELLS = 1 << 26
def _aligned_cells(lo: int, k: int, bits: int, grid, side_bits: np.ndarray, ext_lo: np.ndarray,
                   ext_hi: np.ndarray, chunk: int = 1 << 20) -> Iterator[tuple[int, tuple, tuple]]:
    """The 2^(k-bits) aligned cells of 2^bits slots in the aligned range [lo, lo + 2^k):
    (first code, box lo, box hi) clipped to the extents, empty ones left out; origins are
    decoded vectorized, ``chunk`` cells at a time."""
    side = np.int64(1) << side_bits
    n = 1 << (k - bits)
    for c in range(0, n, chunk):
        idx = np.arange(c, min(n, c + chunk), dtype=np.uint64)
        starts = np.uint64(lo) + (idx << np.uint64(bits))
        ox, oy, oz = morton_decode(starts, grid)
        org = np.stack([ox, oy, oz], axis=1).astype(np.int64)
        b_lo = np.maximum(org, ext_lo)
        b_hi = np.minimum(org + side, ext_hi)
        for i in np.flatnonzero(np.all(b_hi > b_lo, axis=1)).tolist():
            yield int(starts[i]), tuple(b_lo[i].tolist()), tuple(b_hi[i].tolist())


def _floor_log2(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) of uint64 values >= 1, exact (float64 rounds large values up)."""
    v = np.asarray(v, np.uint64)
    r = np.floor(np.log2(v.astype(np.float64))).astype(np.int64)
    r -= (np.uint64(1) << r.astype(np.uint64)) > v  # rounded up past v: one less
    return r


def _trailing_zeros(v: np.ndarray) -> np.ndarray:
    """Trailing zero bits of uint64 values >= 1."""
    v = np.asarray(v, np.uint64)
    return _floor_log2(v & (~v + np.uint64(1)))


# ---------------------------------------------------------------------------- the source
def open_url(url: str) -> DvidHttpSource:
    """Open ``dvid+http(s)://host:port[?uuid=&instance=&timeout=&retries=&...]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("dvid+http", "dvid+https"):
        raise UserError(f"not a dvid+http(s):// URL: {url!r}")
    if not parts.hostname:
        raise UserError(f"no host in {url!r} (use dvid+http://host:port?uuid=...)")
    q = Query(url, KNOWN_PARAMS)
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"bad port in {url!r}") from None
    return DvidHttpSource(
        host=parts.hostname,
        port=port,
        https=parts.scheme == "dvid+https",
        uuid=q.str("uuid"),
        instance=q.str("instance", "segmentation"),
        timeout=q.float("timeout", 60.0, 0.01, 3600),
        retries=q.int("retries", 6, 0, 100),
        backoff=q.float("backoff", 0.2, 0.0, 60),
        box_bits=q.int("box_bits", 12, 0, 30),
        parallel=q.int("parallel", 4, 1, 64),
        throttle=q.bool("throttle"),
        minpoint=_point(q, "minpoint", url),
        maxpoint=_point(q, "maxpoint", url),
        inflight=q.int("inflight", None, 1, 256),
        token_file=q.str("token_file"),
        index_parallel=q.int("index_parallel", None, 1, 64),
        index_batch=_index_batch(q, url),
        rows_per_label=q.int("rows_per_label", ROWS_PER_LABEL, 1, 1 << 40),
        labels=q.choice("labels", ("auto", "existing", "listlabels")),
        box_shape=q.choice("box_shape", ("rows", "cube")),
        spec=q.str("spec"),
    )


#: the options of a dvid+http URL (module docstring)
KNOWN_PARAMS = ("uuid", "instance", "timeout", "retries", "backoff", "box_bits", "parallel",
                "throttle", "minpoint", "maxpoint", "inflight", "token_file", "index_parallel",
                "index_batch", "rows_per_label", "labels", "box_shape", "spec")


def _index_batch(q: Query, url: str) -> int:
    n = q.int("index_batch", INDICES_PER_REQUEST, 1, None)
    if n > DVID_MAX_INDICES:
        raise UserError(f"index_batch={n} in {url!r}: DVID returns at most {DVID_MAX_INDICES:,} "
                        f"label indices per request; use index_batch={DVID_MAX_INDICES} or less")
    return n


def _point(q: Query, key: str, url: str) -> tuple[int, int, int] | None:
    if key not in q:
        return None
    try:
        p = vec3(int(v) for v in q.str(key, "").split(","))
    except ValueError:
        p = (-1, -1, -1)
    if min(p) < 0:
        raise UserError(f"parameter {key}={q.str(key)!r} in {url!r} must be X,Y,Z (>= 0 voxels)")
    return p


class DvidHttpSource:
    """A DVID labelmap instance at one UUID, read over HTTP (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        https: bool = False,
        uuid: str | None = None,
        instance: str = "segmentation",
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.2,
        box_bits: int = 12,
        parallel: int = 4,
        throttle: bool = False,
        minpoint: tuple[int, int, int] | None = None,
        maxpoint: tuple[int, int, int] | None = None,
        inflight: int | None = None,
        token_file: str | None = None,
        index_parallel: int | None = None,
        index_batch: int = INDICES_PER_REQUEST,
        rows_per_label: int = ROWS_PER_LABEL,
        labels: str = "auto",
        box_shape: str = "rows",
        spec: str | None = None,
    ) -> None:
        # throttle=true: DVID admits 1 throttled request per server by default (more after
        # POST /api/server/settings {"throttle": N}; say so with inflight=N)
        if inflight is None:
            inflight = 1 if throttle else parallel
        self.http = _Http(
            "https" if https else "http", host, port, timeout, retries, backoff,
            inflight=inflight, token=dvid_token(token_file), token_from=token_origin(token_file),
        )
        self.instance = instance
        self.box_bits = box_bits
        self.parallel = parallel
        self.index_parallel = parallel if index_parallel is None else index_parallel
        if not 1 <= index_batch <= DVID_MAX_INDICES:
            raise UserError(f"index_batch={index_batch}: DVID returns 1..{DVID_MAX_INDICES:,} "
                            "label indices per request")
        self.index_batch = index_batch
        self.rows_per_label = rows_per_label
        self.labels_from = labels
        self.box_shape = box_shape
        self.spec_path = spec
        self._spec: list[dict] | None = None
        if spec:
            from dvidetl.sources._shard_files import _load_spec

            self._spec = _load_spec(spec)
        self._labels: np.ndarray | None = None
        self.throttle = throttle
        self._minpoint, self._maxpoint = minpoint, maxpoint
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._mapping: tuple[np.ndarray, np.ndarray] | None = None
        #: the version as the user named it (a prefix, ``PREFIX:BRANCH``, ``:BRANCH``, a full
        #: UUID; None: discovered), and the node it names, resolved once: every request
        #: reads that full UUID, so a branch that moves on cannot change the export under it
        self.requested_uuid = uuid or None
        node = self._resolve(uuid) if uuid else self._discover_uuid()
        self.uuid, self.locked = node.uuid, node.locked
        self._info = dataclasses.replace(self._load_info(), locked=self.locked,
                                         requested_uuid=self.requested_uuid)
        if self.requested_uuid and self.requested_uuid != self.uuid:
            log.info("uuid=%s is DVID node %s (%s)", self.requested_uuid, self.uuid,
                     {True: "locked", False: "not locked", None: "lock state unknown"}[self.locked])
        if self.locked is False:
            log.warning(
                "DVID node %s is not locked: its range reads are not one snapshot, so an export "
                "of it is not reproducible (lock the node, or export a locked one)", self.uuid,
            )

    def _resolve(self, requested: str) -> DvidNode:
        """The full node UUID and lock state of what ``uuid=`` names (``_dvid_versions``).

        Why before anything else: the lock must be checked on the node that is exported
        (``5f3b:master`` is the branch's leaf, not the locked ``5f3b``), and the export is
        named by the full UUID, so ``5f3b`` and its full UUID are one export, not two."""
        try:
            return resolve_node(self._json, requested, self.http.base)
        except (DvidUnavailable, DvidAuthError):
            raise
        except DvidHttpError as exc:
            raise DvidHttpError(f"uuid={requested}: DVID at {self.http.base} cannot resolve it "
                                f"to a version: {first_line(exc, 400)}") from None

    # -------------------------------------------------------------- info
    def _node(self, endpoint: str) -> str:
        return f"/api/node/{quote(self.uuid, safe=':')}/{quote(self.instance)}/{endpoint}"

    def _json(self, path: str) -> Any:
        def parse(body: bytes) -> Any:
            try:
                return json.loads(body)
            except ValueError:
                raise _StreamError(0, "response is not JSON", body) from None

        return self.http.get(path, parse)

    def _discover_uuid(self) -> DvidNode:
        """No uuid given: the single leaf node of the server's only repo, else ask."""
        repos = self._json("/api/repos/info")
        leaves = []
        if isinstance(repos, dict):
            for repo in repos.values():
                nodes = ((repo or {}).get("DAG") or {}).get("Nodes") or {}
                for key, node in nodes.items():
                    if not (node or {}).get("Children"):
                        leaves.append((str((node or {}).get("UUID") or key), node or {}))
        if len(repos or {}) != 1 or len(leaves) != 1:
            raise UserError(
                f"{self.http.base} holds {len(repos or {})} repo(s) with leaf nodes "
                f"{[u for u, _ in leaves[:10]]}: name the version with ?uuid=..."
            )
        full, node = leaves[0]
        return DvidNode(full, full, bool(node["Locked"]) if "Locked" in node else None,
                        str(node.get("Branch") or ""))

    def _load_info(self) -> VolumeInfo:
        url = self.http.base + self._node("info")
        d = self._json(self._node("info"))
        try:
            base, ext = d["Base"], d["Extended"]
        except (KeyError, TypeError):
            raise DvidHttpError(
                f"{url}: not a DVID data instance info (no Base/Extended)"
            ) from None
        type_name = base.get("TypeName")
        if type_name not in (None, "labelmap"):
            raise DvidHttpError(
                f"{url}: instance {self.instance!r} is a {type_name}, not a labelmap"
            )
        comp = str(base.get("Compression") or "gzip").lower()
        if comp.startswith("gzip"):
            codec = "gzip"
        elif comp.startswith("no compression") or comp.startswith("none"):
            codec = "none"
        else:
            raise DvidHttpError(
                f"{url}: blocks are stored with {base.get('Compression')!r}; DVID serves /blocks "
                "correctly only for gzip (or uncompressed) storage"
            )
        bs = tuple(int(v) for v in (ext.get("BlockSize") or (64, 64, 64)))
        extents = d.get("Extents") or {}
        pmin = self._minpoint or extents.get("MinPoint") or ext.get("MinPoint")
        pmax = self._maxpoint or extents.get("MaxPoint") or ext.get("MaxPoint")
        if pmin is None and pmax is not None and self._maxpoint is not None:
            pmin = (0, 0, 0)
        if pmin is None or pmax is None:
            raise DvidHttpError(
                f"{url}: DVID reports no extents for {self.instance!r} (POST /extents first)"
            )
        pmin = tuple(int(v) for v in pmin)
        pmax = tuple(int(v) for v in pmax)
        if min(pmin) < 0 or min(pmax) < 0:
            raise DvidHttpError(
                f"{url}: extents {pmin}..{pmax} include negative coordinates, which dvidetl does "
                "not support (Morton codes need non-negative block coordinates)"
            )
        if any(pmin[d] > pmax[d] for d in range(3)):
            raise DvidHttpError(
                f"{url}: empty extents MinPoint {pmin} > MaxPoint {pmax} (no blocks written yet?)"
            )
        max_level = int(ext.get("MaxDownresLevel") or 0)
        if self._spec is not None:
            if len(self._spec) < max_level + 1:
                log.warning("spec %s has %d scales, DVID %d: exporting the first %d", self.spec_path,
                            len(self._spec), max_level + 1, len(self._spec))
                max_level = len(self._spec) - 1
            log.info("grid of every scale from the neuroglancer spec %s (ceil(size / %s)), as "
                     "export-shards uses it: Morton codes equal the shards'; blocks read only "
                     "inside DVID's extents %s..%s", self.spec_path, bs, pmin, pmax)
        else:
            log.info("grid of every scale from DVID's extents (MaxPoint %s): pass spec= to plan "
                     "on the neuroglancer spec's grid instead", pmax)
        scales = []
        self._box = {}
        for s in range(max_level + 1):
            f = 1 << s
            # where DVID has data at this scale: the extents (inclusive voxels) scaled down
            vmin = tuple(pmin[d] // f for d in range(3))
            vmax = tuple(pmax[d] // f + 1 for d in range(3))
            if self._spec is not None:
                size = [int(v) for v in self._spec[s]["size"]]
                grid = tuple(max(1, math.ceil(size[d] / bs[d])) for d in range(3))
                vmax = tuple(min(vmax[d], size[d]) for d in range(3))
            else:
                grid = tuple(max(1, math.ceil(vmax[d] / bs[d])) for d in range(3))
            # the block box read and counted: the extents' blocks within the grid (spec=
            # planned over empty space before: ~1.5e9 slots for a few hundred mCNS blocks)
            b_lo = tuple(min(vmin[d] // bs[d], grid[d]) for d in range(3))
            b_hi = tuple(max(b_lo[d], min(-(-vmax[d] // bs[d]), grid[d])) for d in range(3))
            self._box[s] = (b_lo, b_hi)
            scales.append(ScaleInfo(scale=s, block_size=vec3(bs), grid=vec3(grid), voxel_min=vec3(vmin),
                                    voxel_max=vec3(max(vmin[d], vmax[d]) for d in range(3))))
        if any(hi <= lo for lo, hi in zip(*self._box[0], strict=True)):
            log.warning("DVID's extents %s..%s lie outside the spec's grid %s: nothing to read",
                        pmin, pmax, scales[0].grid)
        return VolumeInfo(
            uuid=self.uuid,
            instance=self.instance,
            codec=codec,
            scales=scales,
            has_mapping=True,
            has_indices=bool(ext.get("IndexedLabels", True)),
        )

    def info(self) -> VolumeInfo:
        return self._info

    def _scale(self, scale: int) -> ScaleInfo:
        try:
            return self._info.scale(scale)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None

    # -------------------------------------------------------------- count
    def count(self, scale: int, cell_bits: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Upper bounds: block slots inside the extents per Morton cell (``exact=False``).

        A cell ``code >> cell_bits`` is an aligned box whose side along each axis is 2^(bits of
        that axis among the low ``cell_bits`` code bits); its count is the product of the per-axis
        overlaps with the extents, so nothing is enumerated per block slot.
        """
        sc = self._scale(scale)
        if cell_bits < 0:
            raise UserError(f"count cell_bits must be >= 0, got {cell_bits}")
        grid = sc.grid
        k = [0, 0, 0]
        for d, _i, j in _bit_plan(grid):
            if j < cell_bits:
                k[d] += 1
        lo_b, hi_b = self._box[scale]
        if any(hi_b[d] <= lo_b[d] for d in range(3)):
            z = np.zeros(0, np.uint64)
            return z, z, False
        c_lo = [lo_b[d] >> k[d] for d in range(3)]
        c_hi = [((hi_b[d] - 1) >> k[d]) + 1 for d in range(3)]
        ncells = math.prod(c_hi[d] - c_lo[d] for d in range(3))
        if ncells > MAX_COUNT_CELLS:
            raise UserError(
                f"count with cell_bits {cell_bits} of scale {scale} would list {ncells:,} cells "
                f"(more than {MAX_COUNT_CELLS:,}): ask for coarser cells (more cell_bits)"
            )
        per_axis = []
        origins = []
        for d in range(3):
            c = np.arange(c_lo[d], c_hi[d], dtype=np.int64)
            a = np.maximum(c << k[d], lo_b[d])
            b = np.minimum((c + 1) << k[d], hi_b[d])
            per_axis.append(np.maximum(b - a, 0).astype(np.uint64))
            origins.append((c << k[d]).astype(np.uint64))
        ox, oy, oz = np.meshgrid(*origins, indexing="ij")
        nx, ny, nz = np.meshgrid(*per_axis, indexing="ij")
        counts = (nx * ny * nz).ravel()
        shift = np.uint64(min(cell_bits, 63))
        cells = morton_encode(ox.ravel(), oy.ravel(), oz.ravel(), grid)
        cells = cells >> shift if cell_bits < 64 else np.zeros_like(cells)
        order = np.argsort(cells, kind="stable")
        cells, counts = cells[order], counts[order]
        keep = counts > 0
        return cells[keep], counts[keep], False

    # -------------------------------------------------------------- blocks
    def _boxes(self, scale: int, lo: int, hi: int) -> Iterator[tuple[int, int, list]]:
        """Requests covering ``[lo, hi)`` in ascending Morton ranges: (code_lo, code_hi,
        [(box_lo, box_hi), ...]) clipped to the extents, at most ``2^box_bits`` slots a box:
        an aligned cube per range (``box_shape=cube``) or, for ranges bigger than one box,
        boxes of whole X rows (``rows``, the default: fewer DVID range scans)."""
        sc = self._scale(scale)
        grid = sc.grid
        plan = _bit_plan(grid)
        total = sum(axis_bits(grid))
        ext_lo, ext_hi = (np.array(v, dtype=np.int64) for v in self._box[scale])

        def side_bits(kbits: int) -> np.ndarray:
            kk = np.zeros(3, dtype=np.int64)
            for d, _i, j in plan:
                if j < kbits:
                    kk[d] += 1
            return kk

        hi = min(hi, 1 << total)
        m = min(self.box_bits, total)
        while lo < hi:
            k = (lo & -lo).bit_length() - 1 if lo else total
            while lo + (1 << k) > hi:
                k -= 1
            kb = min(k, m)
            if self.box_shape == "rows" and k > kb:
                yield from self._row_groups(lo, k, kb, grid, side_bits, ext_lo, ext_hi)
                lo += 1 << k
                continue
            # a big aligned range: its 2^kb sub-boxes
            for c0, b_lo, b_hi in _aligned_cells(lo, k, kb, grid, side_bits(kb), ext_lo, ext_hi):
                yield c0, c0 + (1 << kb), [(b_lo, b_hi)]
            lo += 1 << k

    def count_requests(self, kind: str, scale: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The HTTP requests reading each range ``[lo[i], hi[i])`` sends DVID (``plan``
        shows them): ``/blocks`` boxes for ``blocks`` — exactly those ``read_blocks`` sends,
        none outside the extents —, ``/indices-compressed`` requests of ``index_batch``
        listed labels for ``indices``, and the one ``/mappings`` (cached for the serving
        process) counted with the first ``mapping`` range."""
        lo = np.asarray(lo, np.uint64)
        hi = np.asarray(hi, np.uint64)
        if kind == "blocks":
            return self._block_requests(scale, lo, hi)
        if kind == "indices":
            if not self._info.has_indices:
                return np.zeros(lo.size, np.uint64)
            labels = self.label_list()
            n = np.searchsorted(labels, hi) - np.searchsorted(labels, lo)
            return (-(-n // self.index_batch)).astype(np.uint64)
        out = np.zeros(lo.size, np.uint64)
        if kind == "mapping" and lo.size:
            out[int(np.argmin(lo))] = 1
        return out

    def _block_requests(self, scale: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``count_requests`` of block ranges, vectorized (a male-CNS plan has ~10^6 ranges):
        each range is cut into its aligned pieces as ``_boxes`` cuts it; a piece of ``k``
        bits is read as the cells of ``min(k, box_bits)`` bits that meet the extents, counted
        per axis; only row-shaped pieces larger than one request (rare: a partition is about
        one request's size) walk ``_row_groups``."""
        sc = self._scale(scale)
        grid = sc.grid
        total = sum(axis_bits(grid))
        plan = _bit_plan(grid)
        side = np.zeros((total + 1, 3), np.int64)  # per-axis side bits of a k-bit aligned cell
        for d, _i, j in plan:
            side[j + 1:, d] += 1
        ext_lo, ext_hi = (np.array(v, dtype=np.int64) for v in self._box[scale])
        kb = min(self.box_bits, total)
        end = np.uint64(1 << total) if total < 64 else np.uint64(KEY_END - 1)
        out = np.zeros(lo.size, np.uint64)
        cur, stop = lo.copy(), np.minimum(hi, end)
        idx = np.flatnonzero(cur < stop)
        rows_pieces = []
        while idx.size:
            a, n = cur[idx], stop[idx] - cur[idx]
            # the largest aligned piece at a that fits: trailing zeros of a, log2 of what is left
            tz = np.where(a == 0, 64, _trailing_zeros(np.maximum(a, np.uint64(1))))
            k = np.minimum(tz, _floor_log2(n)).astype(np.int64)
            big = (k > kb) if self.box_shape == "rows" else np.zeros(k.size, bool)
            if big.any():
                rows_pieces += list(zip(idx[big].tolist(), a[big].tolist(), k[big].tolist(),
                                        strict=True))
            sm = ~big
            if sm.any():
                b = np.minimum(k[sm], kb)
                ox, oy, oz = morton_decode(a[sm], grid)
                org = np.stack([ox, oy, oz], axis=1).astype(np.int64)
                c_lo = np.maximum(org, ext_lo)
                c_hi = np.minimum(org + (np.int64(1) << side[k[sm]]), ext_hi)
                sub = side[b]
                per = np.where(c_hi > c_lo, ((c_hi - 1) >> sub) - (c_lo >> sub) + 1, 0)
                np.add.at(out, idx[sm], per.prod(axis=1).astype(np.uint64))
            cur[idx] = a + (np.uint64(1) << k.astype(np.uint64))
            idx = idx[cur[idx] < stop[idx]]
        for i, a, k in rows_pieces:
            for _c0, _c1, boxes in self._row_groups(a, k, kb, grid,
                                                    lambda kk: side[kk], ext_lo, ext_hi):
                out[i] += len(boxes)
        return out

    def _row_groups(self, lo: int, k: int, kb: int, grid, side_bits, ext_lo, ext_hi):
        """An aligned range of 2^k slots (k > kb) as groups of 2^(kb+4) slots, each fetched as
        boxes holding whole X rows of the group (DVID reads a box with one Badger range scan
        per (y, z) row: rows of a 16^3 cube are 16 keys long, a group's up to 4x longer), at
        most 2^kb slots per request. A group's blocks are one Morton range: they are merged
        and sorted before they are served, so the stream stays in Morton order."""
        span = kb + min(k - kb, GROUP_BITS)
        for c0, (x0, y0, z0), (x1, y1, z1) in _aligned_cells(lo, k, span, grid, side_bits(span),
                                                               ext_lo, ext_hi):
            ny = max(1, min(y1 - y0, (1 << kb) // (x1 - x0)))
            nz = max(1, min(z1 - z0, (1 << kb) // ((x1 - x0) * ny)))
            boxes = [((x0, y, z), (x1, min(y + ny, y1), min(z + nz, z1)))
                     for z in range(z0, z1, nz) for y in range(y0, y1, ny)]
            yield c0, c0 + (1 << span), boxes

    def _fetch_box(self, scale: int, box_lo: tuple, box_hi: tuple) -> tuple:
        """One /blocks request: (x, y, z, morton, data, offsets) sorted by Morton."""
        sc = self._info.scale(scale)
        bs = sc.block_size
        size = "_".join(str((box_hi[d] - box_lo[d]) * bs[d]) for d in range(3))
        off = "_".join(str(box_lo[d] * bs[d]) for d in range(3))
        path = self._node(f"blocks/{size}/{off}?compression=blocks&supervoxels=true&scale={scale}")
        if self.throttle:
            path += "&throttle=true"
        want_gzip = self._info.codec == "gzip"
        blo = np.array(box_lo, dtype=np.int64)
        bhi = np.array(box_hi, dtype=np.int64)
        grid = sc.grid

        def parse(body: bytes) -> tuple:
            buf = np.frombuffer(body, dtype=np.uint8)
            n, xs, ys, zs, starts, lens, err_off, err = _scan_block_records(
                buf, blo, bhi, want_gzip
            )
            if err:
                raise _StreamError(int(err_off), _ERRS[int(err)], body)
            xs, ys, zs = xs[:n], ys[:n], zs[:n]
            codes = morton_encode(xs, ys, zs, grid)
            order = np.argsort(codes, kind="stable")
            codes = codes[order]
            if n > 1 and np.any(codes[1:] == codes[:-1]):
                i = int(np.flatnonzero(codes[1:] == codes[:-1])[0])
                raise _StreamError(int(starts[order[i + 1]]) - 16, "block sent twice", body)
            data, offsets = _gather(buf, starts[:n], lens[:n], order)
            return xs[order], ys[order], zs[order], codes, data, offsets

        return self.http.get(path, parse)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(self.parallel, self.index_parallel),
                                                thread_name_prefix="dvid-http")
            return self._pool

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored blocks with ``lo <= morton < hi``, ascending, as gzip payloads."""
        self._scale(scale)
        lo, hi = max(int(lo), 0), int(hi)
        pool = self._executor()
        groups = self._boxes(scale, lo, hi)
        # every box is its own request (several in flight); a group's parts merge in order
        window: deque[list[Future]] = deque()
        pending: list[tuple] = []
        pending_bytes = 0
        try:
            while True:
                while sum(len(w) for w in window) < 2 * self.parallel:
                    nxt = next(groups, None)
                    if nxt is None:
                        break
                    window.append([pool.submit(self._fetch_box, scale, b_lo, b_hi)
                                   for b_lo, b_hi in nxt[2]])
                if not window:
                    break
                part = _merge_parts([f.result() for f in window.popleft()])
                if part[3].size == 0:
                    continue
                pending.append(part)
                pending_bytes += int(part[5][-1])
                nblocks = sum(p[3].size for p in pending)
                if pending_bytes >= MAX_BATCH_BYTES or nblocks >= MAX_BATCH_BLOCKS:
                    yield from self._emit(pending)
                    pending, pending_bytes = [], 0
            if pending:
                yield from self._emit(pending)
        finally:
            for fs in window:
                for f in fs:
                    f.cancel()

    @staticmethod
    def _emit(parts: list[tuple]) -> Iterator[pa.RecordBatch]:
        """Batches of <= MAX_BATCH_BYTES payload (at least one block each) from sorted parts."""
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        z = np.concatenate([p[2] for p in parts])
        codes = np.concatenate([p[3] for p in parts])
        lens = np.concatenate([np.diff(p[5]) for p in parts])
        data = np.concatenate([p[4] for p in parts]) if len(parts) > 1 else parts[0][4]
        offsets = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        for a, b in spans(lens, MAX_BATCH_BYTES, MAX_BATCH_BLOCKS):
            sub_off = offsets[a : b + 1] - offsets[a]
            arr = _binary_array(data[offsets[a] : offsets[b]], sub_off)
            yield pa.RecordBatch.from_arrays(
                [pa.array(x[a:b]), pa.array(y[a:b]), pa.array(z[a:b]), pa.array(codes[a:b]), arr],
                schema=BLOCKS_WIRE_SCHEMA,
            )

    # -------------------------------------------------------------- mapping
    def _mapping_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._mapping is not None:
                return self._mapping
        url = self.http.base + self._node("mappings?format=binary")

        def parse(body: bytes) -> np.ndarray:
            return parse_mappings(body)

        pairs = self.http.get(self._node("mappings?format=binary"), parse)
        sv, body = drop_background(pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64), url)
        sv, body = dedupe_pairs(sv, body, url, error=DvidHttpError)
        with self._lock:
            if self._mapping is None:
                self._mapping = (sv, body)
            return self._mapping

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel (identity where unmapped), from the cached /mappings."""
        keys, vals = self._mapping_arrays()
        svs = np.asarray(svs, dtype=np.uint64)
        out = svs.copy()
        if keys.size and svs.size:
            pos = np.minimum(np.searchsorted(keys, svs), keys.size - 1)
            hit = keys[pos] == svs
            out[hit] = vals[pos[hit]]
        out[svs == 0] = 0  # background is never mapped
        return out

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Pairs with ``lo <= supervoxel < hi`` from the cached sorted /mappings arrays."""
        return mapping_batches(*self._mapping_arrays(), lo, hi)

    def count_keys(self, kind: str, cell_bits: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """Mapping: exact, from the cached /mappings. Indices: the labels exactly (from the
        cached label list, see ``label_list``), their rows estimated at ``rows_per_label``
        each (DVID would have to read every index to count them)."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, cell_bits, lo, hi)
        if not self._info.has_indices:
            return count_sorted(np.zeros(0, np.uint64), None, cell_bits, lo, hi)
        kc = count_sorted(self.label_list(), None, cell_bits, lo, hi, exact=False)
        return kc._replace(rows=kc.keys * np.uint64(self.rows_per_label))

    # -------------------------------------------------------------- indices
    def label_list(self) -> np.ndarray:
        """Every body label with an index, ascending; fetched once and cached, so planning
        and every indices partition share one listing. ``/existing-labels`` walks only the
        keys of DVID's label-index space (no values read); DVIDs without it get paged
        ``/listlabels``, which reads every index value (a second full pass besides the
        export's own /indices-compressed)."""
        with self._lock:
            if self._labels is not None:
                return self._labels
        labels = None
        if self.labels_from in ("auto", "existing"):
            try:
                labels = self._existing_labels()
            except DvidHttpError as exc:
                if self.labels_from == "existing" or isinstance(exc, (DvidUnavailable, DvidAuthError)):
                    raise
                log.info("DVID has no /existing-labels (%s); listing labels with /listlabels",
                         first_line(exc))
        if labels is None:
            labels = self.list_labels(0, KEY_END)
        with self._lock:
            if self._labels is None:
                self._labels = labels
            return self._labels

    def _existing_labels(self) -> np.ndarray:
        path = self._node("existing-labels")

        def parse(body: bytes) -> np.ndarray:
            text = body.strip()
            if not text.startswith(b"[") or not text.endswith(b"]"):
                raise _StreamError(0, "/existing-labels did not answer one JSON array", body)
            try:
                vals = json.loads(text)
            except ValueError as exc:
                raise _StreamError(0, f"/existing-labels is not JSON ({exc})", body) from None
            arr = np.array(vals, dtype=np.uint64) if vals else np.zeros(0, np.uint64)
            arr = np.unique(arr)
            return arr[arr != 0]

        return self.http.get(path, parse)

    def list_labels(self, lo: int, hi: int) -> np.ndarray:
        """Body labels with an index, ``lo <= label < hi``, ascending (paged /listlabels)."""
        out: list[np.ndarray] = []
        start = max(int(lo), 0)
        while start < hi:

            def parse(body: bytes, start=start) -> np.ndarray:
                if len(body) >= 32 and body[-32:] == bytes(32):
                    raise _StreamError(
                        len(body) - 32, "DVID signalled an error (32 zero bytes)", body
                    )
                if len(body) % 8:
                    raise _StreamError(len(body) - len(body) % 8, "not whole uint64 labels", body)
                labels = np.frombuffer(body, dtype="<u8").astype(np.uint64)
                if labels.size and (
                    labels[0] < np.uint64(start) or np.any(labels[1:] <= labels[:-1])
                ):
                    raise _StreamError(0, "labels not ascending from start", body)
                return labels

            page = self.http.get(
                self._node(f"listlabels?start={start}&number={LISTLABELS_PAGE}"), parse
            )
            if page.size == 0:
                break
            out.append(page[page < np.uint64(min(hi, KEY_END - 1))] if hi < KEY_END else page)
            last = int(page[-1])
            if page.size < LISTLABELS_PAGE or last >= hi - 1 or last >= KEY_END - 1:
                break
            start = last + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)

    def _fetch_indices(self, chunk: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """One /indices-compressed request: (labels, unwrapped protobufs) of ``chunk``, the
        label of each record taken from its header (old stored protobufs carry label 0)."""
        url = self.http.base + self._node("indices-compressed")
        want = set(chunk.tolist())
        body = json.dumps(chunk.tolist()).encode()

        def parse(data: bytes) -> tuple[list[int], list[bytes]]:
            got_l: list[int] = []
            got_d: list[bytes] = []
            p = 0
            while p < len(data):
                if len(data) - p < 16:
                    raise _StreamError(p, "truncated index record header", data)
                n, label = struct.unpack_from("<QQ", data, p)
                if n == 0 and label == 0:
                    raise _StreamError(p, "DVID signalled an error (record n=0, label=0)", data)
                if label not in want:
                    raise _StreamError(p, f"unrequested label {label}", data)
                if p + 16 + n > len(data):
                    raise _StreamError(p, "index record runs past the end of the body", data)
                if n:
                    got_l.append(label)
                    got_d.append(_unwrap_index(data[p + 16 : p + 16 + n], url, label))
                p += 16 + n
            return got_l, got_d

        got_l, got_d = self.http.get(self._node("indices-compressed"), parse, body=body)
        arr = np.array(got_l, dtype=np.uint64)
        order = np.argsort(arr, kind="stable")
        return arr[order], [got_d[i] for i in order.tolist()]

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """LabelIndex protobufs (unwrapped) of the labels in ``[lo, hi)``, ascending: the
        labels from the cached list, fetched ``index_batch`` per /indices-compressed request
        with ``index_parallel`` requests in flight, delivered in label order.

        Nothing for an instance with ``IndexedLabels: false`` (DVID keeps no indices then)."""
        if not self._info.has_indices:
            return
        labels = self.label_list()
        labels = labels[key_slice(labels, int(lo), int(hi))]
        pool = self._executor()
        chunks = (labels[a : a + self.index_batch] for a in range(0, labels.size, self.index_batch))
        window: deque[Future] = deque()
        try:
            while True:
                while len(window) < self.index_parallel:
                    nxt = next(chunks, None)
                    if nxt is None:
                        break
                    window.append(pool.submit(self._fetch_indices, nxt))
                if not window:
                    break
                got_l, got_d = window.popleft().result()
                if got_l.size:
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(got_l), pa.array(got_d, pa.binary())], schema=INDICES_SCHEMA
                    )
        finally:
            for f in window:
                f.cancel()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            self._mapping = None
        self.http.close()


__all__ = [
    "DvidAuthError", "DvidHttpError", "DvidHttpSource", "DvidUnavailable", "dvid_token", "open_url",
]
