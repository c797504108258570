"""Loading the Lua scripts (leasehold/_shared/redis): the prelude plus one script, and its SHA."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from hashlib import sha1
from importlib import resources

# ----------------------------------------------------------------------- scripts


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


@cache
def _script(name: str) -> _Script:
    folder = resources.files("leasehold") / "_shared" / "redis"
    prelude = (folder / "_prelude.lua").read_text(encoding="utf-8")
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    source = f"{prelude}\n{body}"
    digest = sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return _Script(name=name, source=source, sha=digest)
