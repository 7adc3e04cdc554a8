"""Benchmarks of cargohold against the stack it replaces (`make bench`, `python -m bench.run`).

The rig of the tests (tests/rig) is imported as the top-level package `rig`, as the tests do.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
