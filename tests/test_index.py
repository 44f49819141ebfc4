"""tests/README.md indexes every test file by the part of `ood/` it tests: a new file that is not listed fails here."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_file_is_in_the_index() -> None:
    listed = set(re.findall(r"`(test_\w+\.py)`", (TESTS / "README.md").read_text()))
    present = {p.name for p in TESTS.glob("test_*.py")}
    assert present - listed == set(), "add these files to tests/README.md"
    assert listed - present == set(), "tests/README.md lists files that do not exist"
