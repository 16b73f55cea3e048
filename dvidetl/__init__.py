"""dvidetl — export a DVID labelmap at one UUID into VastDB (or Parquet), exactly once."""

__version__ = "0.1.0"
