"""Plugins by URL scheme (``dvidetl.registry``): sources get the same hooks as sinks — an
installed package's entry points and an environment variable — and moved public module
paths still import, with a ``DeprecationWarning`` naming the new one (``dvidetl._moved``).

The plugins here are real packages as far as ``importlib.metadata`` can tell: a module and
a ``*.dist-info`` directory with ``entry_points.txt`` on ``sys.path``, found the way an
installed distribution is."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from dvidetl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A source plugin: the synthetic volume under another scheme, and a sink plugin: Parquet
under another scheme (what a third-party package would register)."""
from dvidetl.sources.synthetic import SyntheticSource
from dvidetl.sinks.parquet import open_url as _parquet, list_exports as _list


def open_source(url):
    src = SyntheticSource("synthetic://" + url.split("://", 1)[1])
    src.opened_by = "plugin"
    return src


def open_sink(url, *, uuid, instance):
    return _parquet("parquet://" + url.split("://", 1)[1], uuid=uuid, instance=instance)


def list_exports(url):
    return _list("parquet://" + url.split("://", 1)[1])
'''


def _install(where: Path, name: str, entry_points: str) -> Path:
    """The module ``NAME`` and a distribution ``NAME`` with ``entry_points`` in ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.py").write_text(PLUGIN)
    info = where / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return where


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    d = _install(tmp_path / "site", "dvidetl_test_plugin", """
        [dvidetl.sources]
        ep+synthetic = dvidetl_test_plugin:open_source

        [dvidetl.sinks]
        ep+parquet = dvidetl_test_plugin:open_sink
    """)
    monkeypatch.syspath_prepend(str(d))
    importlib.invalidate_caches()
    yield d
    sys.modules.pop("dvidetl_test_plugin", None)


def test_a_source_plugin_opens_through_its_entry_point(plugin_dir):
    from dvidetl.sources import SCHEMES, known_schemes, open_source

    assert "ep+synthetic" not in SCHEMES
    assert known_schemes()["ep+synthetic"] == "dvidetl_test_plugin:open_source"
    src = open_source("ep+synthetic://demo?size=128,128,64&scales=1")
    assert src.opened_by == "plugin"
    ref = open_source("synthetic://demo?size=128,128,64&scales=1")
    assert src.info() == ref.info()
    a = list(src.read_blocks(0, 0, 8))
    b = list(ref.read_blocks(0, 0, 8))
    assert sum(x.num_rows for x in a) == sum(x.num_rows for x in b) > 0


def test_a_source_plugin_opens_through_the_environment(tmp_path, monkeypatch):
    (tmp_path / "envplug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dvidetl.sources import known_schemes, open_source

    with pytest.raises(UserError, match=r"unknown source URL scheme .*env\+synthetic.*use one of"):
        open_source("env+synthetic://demo")
    monkeypatch.setenv("DVIDETL_EXTRA_SOURCES", "env+synthetic=envplug:open_source")
    assert known_schemes()["env+synthetic"] == "envplug:open_source"
    assert open_source("env+synthetic://demo?size=128,128,64&scales=1").opened_by == "plugin"
    # the built-in table wins over the environment (a plugin cannot take synthetic:// over)
    monkeypatch.setenv("DVIDETL_EXTRA_SOURCES", "synthetic=envplug:open_source")
    assert not hasattr(open_source("synthetic://demo?size=128,128,64&scales=1"), "opened_by")
    monkeypatch.setenv("DVIDETL_EXTRA_SOURCES", "env+synthetic")
    with pytest.raises(UserError, match="DVIDETL_EXTRA_SOURCES: 'env\\+synthetic' is not scheme=module:callable"):
        known_schemes()
    monkeypatch.setenv("DVIDETL_EXTRA_SOURCES", "gone=no_such_module_here:open")
    with pytest.raises(UserError, match=r"source gone:// is not available in this build \(no module no_such_module_here\)"):
        open_source("gone://x")


def test_register_in_process(tmp_path, monkeypatch):
    """``REGISTRY.register``: a scheme for this process only, checked for its form."""
    from dvidetl.sources import REGISTRY, open_source

    (tmp_path / "regplug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="not 'module:callable'"):
        REGISTRY.register("reg+synthetic", "regplug.open_source")
    monkeypatch.setattr(REGISTRY, "_registered", {})
    REGISTRY.register("reg+synthetic", "regplug:open_source")
    assert open_source("reg+synthetic://demo?size=128,128,64&scales=1").opened_by == "plugin"


def test_a_sink_plugin_opens_and_its_exports_are_found_through_its_entry_point(plugin_dir, tmp_path):
    from dvidetl.export.batch import BlockData
    from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
    from dvidetl.read import open_export
    from dvidetl.sinks import find_export, open_sink
    from dvidetl.sinks.parquet import ParquetSink
    from dvidetl.testing.sink_tests import VOLUME, block_batch

    out = tmp_path / "out"
    sink = open_sink(f"ep+parquet://{out}", uuid="u1", instance="seg")
    assert isinstance(sink, ParquetSink)
    part = Partition("blocks", 0, 0, 100, 3)
    run = RunInfo("r1", "u1", "seg", [part], volume=VOLUME)
    sink.prepare(run)
    data = BlockData(block_batch([1, 2, 3]), num_blocks=3)
    sink.write_partition("r1", part, data, PartitionStats(part.key, "blocks", blocks=3))
    # without the plugin's list_exports the export could not be found without naming it
    assert find_export(f"ep+parquet://{out}") == ("seg", "u1")
    ex = open_export(f"ep+parquet://{out}", run_id="r1")
    assert np.array_equal(np.sort(ex.read("blocks").column("morton").to_numpy()), [1, 2, 3])


def test_the_cli_plans_a_source_named_by_the_environment(tmp_path):
    """The hook reaches a command in another process (as it reaches Dask workers)."""
    (tmp_path / "envplug.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
               DVIDETL_EXTRA_SOURCES="env+synthetic=envplug:open_source")
    p = subprocess.run([sys.executable, "-m", "dvidetl", "plan", "--uuid", "demo", "--source",
                        "env+synthetic://demo?size=256,256,128&scales=1", "--partition-blocks", "8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    blocks = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("blocks")]
    assert blocks and blocks[0][1] == "0"
    env.pop("DVIDETL_EXTRA_SOURCES")
    p = subprocess.run([sys.executable, "-m", "dvidetl", "plan", "--uuid", "demo", "--source",
                        "env+synthetic://demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "unknown source URL scheme" in p.stderr and "Traceback" not in p.stderr


# -- moved module paths warn ------------------------------------------------------------------

@pytest.mark.parametrize("old, new, name", [
    ("dvidetl.schema", "dvidetl.tables.schema", "BLOCKS"),
    ("dvidetl.schema", "dvidetl.tables.schema", "DEFAULT_CELL_LIMIT"),
    # a Dask routes module: distributed.scheduler.http.routes may still list the old path
    ("dvidetl.dashboard", "dvidetl.export.dashboard", "routes"),
])
def test_a_moved_module_forwards_with_a_deprecation_warning(old, new, name):
    mod = importlib.import_module(old)
    target = importlib.import_module(new)
    with pytest.warns(DeprecationWarning, match=rf"^{old} moved to {new}: import {name} from there$"):
        got = getattr(mod, name)
    assert got is getattr(target, name)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        exec(f"from {old} import {name} as _x", {})
    assert name in dir(mod)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError):
            mod.__wrapped__  # noqa: B018 - dunder lookups (pickle, inspect) neither warn nor forward
        with pytest.raises(AttributeError):
            getattr(mod, "no_such_name_anywhere")  # noqa: B009
