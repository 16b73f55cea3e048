"""Sub-commands of `python -m dvidetl`; one module each (see `dvidetl.cli`)."""
