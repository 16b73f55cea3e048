"""Fault injection (issue 7): every test ends with a full verify — no block missing, none
duplicated. `make faults` runs this package and prints a table of the outcomes."""
