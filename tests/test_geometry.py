import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dvidetl.geometry import (
    ScaleInfo,
    VolumeInfo,
    axis_bits,
    in_grid,
    morton_decode,
    morton_encode,
    morton_end,
    shard_of,
)


def _ref_morton(c, grid):
    bits = axis_bits(grid)
    code = j = 0
    for i in range(max(bits)):
        for d in range(3):
            if i < bits[d]:
                code |= ((c[d] >> i) & 1) << j
                j += 1
    return code


def test_tiny_example_from_spec():
    grid = (4, 4, 2)  # bits (2, 2, 1)
    pts = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 1, 0), (3, 3, 1)]
    got = morton_encode(*np.array(pts).T, grid)
    assert got.tolist() == [1, 2, 4, 10, 31]


def test_mcns_scale1_shard(shared_data):
    spec = json.loads((shared_data / "dvid" / "mcns-ng-specs.json").read_text())
    sc = spec["scales"][1]
    grid = tuple(-(-s // 64) for s in sc["size"])
    code = int(morton_encode(509, 413, 469, grid))
    assert code == 0x7F4F7C7
    sh = sc["sharding"]
    assert shard_of(code, sh["preshift_bits"], sh["minishard_bits"], sh["shard_bits"]) == 4073


@given(
    st.tuples(*[st.integers(1, 3000)] * 3),
    st.lists(st.tuples(*[st.floats(0, 1, exclude_max=True)] * 3), min_size=1, max_size=50),
)
def test_roundtrip_matches_reference(grid, fracs):
    pts = np.array([[int(f * g) for f, g in zip(fr, grid, strict=True)] for fr in fracs])
    codes = morton_encode(pts[:, 0], pts[:, 1], pts[:, 2], grid)
    assert [int(c) for c in codes] == [_ref_morton(tuple(p), grid) for p in pts]
    assert (codes < morton_end(grid)).all()
    x, y, z = morton_decode(codes, grid)
    assert np.array_equal(np.stack([x, y, z], 1), pts)
    assert in_grid(x, y, z, grid).all()


def test_volume_info_json_roundtrip():
    v = VolumeInfo("abc", "segmentation", "gzip", [ScaleInfo(0, (64, 64, 64), (3, 4, 5))])
    assert VolumeInfo.from_json(v.to_json()) == v
