"""Seeded fuzzers for what faces the network or an operator's edits: the mirror's and the daemon's HTTP
servers (raw sockets), bundle import (mutated bundles), models.toml and keys.toml parsing.

Each is ``python -m tests.fuzz.<name> --cases N --seed S`` (see docs/fuzzing.md); a short seeded run of
each is tests/integration/test_fuzz.py.
"""
