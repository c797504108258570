"""Run one measurement in another Python interpreter (a subject's own virtual
environment, see ``Subject.python``): ``python -m bench.external`` reads
``[module, function, args]`` as JSON on stdin, calls ``module.function(*args)``
and writes its JSON result on stdout. The repository root must be the working
directory, so that ``bench`` imports; the interpreter needs only the subject's
own library (and the repository's bench package)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def call(python: str, module: str, function: str, args: list[Any], timeout: float) -> Any:
    """``module.function(*args)`` in ``python``; raises RuntimeError with its stderr."""
    proc = subprocess.run(
        [python, "-m", "bench.external"],
        input=json.dumps([module, function, args]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{python}: {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    module, function, args = json.loads(sys.stdin.read())
    result = getattr(importlib.import_module(module), function)(*args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
