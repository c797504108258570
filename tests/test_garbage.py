"""The control of tests/_garbage.py: a module that leaves a socket in a reference
cycle fails in that module, not in a later one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]

LEAKY = """
import socket

def test_leaves_a_socket_in_a_cycle():
    sock = socket.socket()
    box = [sock]
    box.append(box)  # only the garbage collector finalizes it
"""

LATER = """
def test_later():
    pass
"""


@pytest.mark.parametrize("plugin", [True, False], ids=["collected", "control-not-collected"])
def test_a_leak_fails_the_module_that_left_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, plugin: bool
) -> None:
    # The run is a subprocess in a temporary folder: it imports the plugin from here.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_a_leaky=LEAKY, test_b_later=LATER)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    args = ["-p", "tests._garbage"] if plugin else []
    result = pytester.runpytest_subprocess(*args, "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    if plugin:
        # The leak is reported as an error in the teardown of the leaky module's test.
        assert outcomes.get("errors", 0) + outcomes.get("failed", 0) == 1, result.stdout.str()
        result.stdout.fnmatch_lines(["*test_a_leaky.py*", "*unclosed*socket*"])
    else:
        # Without it nothing collects in time: both pass, and the socket is
        # finalized at exit, unattributed.
        assert outcomes.get("passed") == 2, result.stdout.str()
