"""A pytest plugin (loaded by tests/conftest.py): collect garbage after each test
module.

An object that a test leaves unclosed inside a reference cycle (a socket held by a
connection whose parser refers back to it, say) is finalized only when the garbage
collector runs, and its ResourceWarning (an error here: ``filterwarnings = error``)
then fails whichever later test happened to trigger the collector, in another file,
on some runs only. Collecting at the end of every module makes the warning fail
the last test of the module that left the object, which names where to look.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def _collect_module_garbage() -> Iterator[None]:
    yield
    gc.collect()
