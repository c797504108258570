"""The Lua scripts (leasehold/_shared/redis), in the two forms a server runs them:

* a **function library** (Redis 7 Functions, ``FCALL``): the prelude and every
  script loaded once per server with ``FUNCTION LOAD``. The prelude's helpers are
  then defined once, at load, instead of on every call: an uncontended acquire +
  release costs Redis 32,000 instructions less of its 233,000 (callgrind), about
  7 µs of server time on a 2-core VM. The standalone store's default.
* **scripts** (``EVALSHA``): the prelude plus one script, loaded with ``SCRIPT
  LOAD``. Used in a cluster (redis-py routes an ``FCALL`` by asking a node for its
  keys, a round trip more per call) and wherever the server or the user's ACL
  refuses functions.

Both run the same Lua on the same keys, so clients of either form share leases.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from hashlib import sha1
from importlib import resources
from typing import Final

from redis import exceptions as redis_errors

# Every script, and the flags its function is registered with (a flag changes how
# Redis treats the call, not what the Lua does). A script with no flags is refused
# before it runs while Redis is out of memory (maxmemory reached): acquire and the
# record writes, which add data. "allow-oom": release, break and renew shrink or
# rewrite what exists (under EVALSHA, release and break ran out of memory too,
# their first write being one Redis allows then; renew's SET was refused).
# "no-writes": the read-only views, allowed out of memory as before.
SCRIPT_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "acquire": (),
    "release": ("allow-oom",),
    "break": ("allow-oom",),
    "renew": ("allow-oom",),
    "holders": ("no-writes",),
    "leases": ("no-writes",),
    "waiters": ("no-writes",),
    "record_read": ("no-writes",),
    "record_write": (),
    "fenced_write": (),
}


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str  # the prelude and the script: what SCRIPT LOAD takes
    sha: str
    function: str  # its name in the library (FCALL)


@dataclass(frozen=True, slots=True)
class _Library:
    name: str
    source: str  # what FUNCTION LOAD takes


def _folder_text(name: str) -> str:
    folder = resources.files("leasehold") / "_shared" / "redis"
    return (folder / f"{name}.lua").read_text(encoding="utf-8")


@cache
def _library() -> _Library:
    """One library per version of the scripts: its name carries a digest of their
    text, so clients of different leasehold versions on one server each call their
    own functions (a rolling upgrade leaves the older library behind; see
    docs/backends.md)."""
    bodies = {name: _folder_text(name) for name in SCRIPT_FLAGS}
    prelude = _folder_text("_prelude")
    digest = sha1(usedforsecurity=False)
    for text in (prelude, *(f"{name}\n{body}" for name, body in sorted(bodies.items()))):
        digest.update(text.encode("utf-8"))
    name = f"leasehold_{digest.hexdigest()[:16]}"
    parts = [f"#!lua name={name}", prelude]
    for script, body in bodies.items():
        flags = ", ".join(f"'{flag}'" for flag in SCRIPT_FLAGS[script])
        # A function gets its keys and arguments as parameters where a script has
        # the globals KEYS and ARGV: named so, the script's text runs unchanged.
        parts.append(
            f"redis.register_function{{function_name = '{name}_{script}', "
            f"flags = {{{flags}}}, callback = function(KEYS, ARGV)\n{body}\nend}}"
        )
    return _Library(name=name, source="\n".join(parts))


@cache
def _script(name: str) -> _Script:
    source = f"{_folder_text('_prelude')}\n{_folder_text(name)}"
    digest = sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return _Script(name=name, source=source, sha=digest, function=f"{_library().name}_{name}")


def function_missing(exc: BaseException) -> bool:
    """FCALL of a function the server does not have (not loaded yet, or lost by a
    restart, a failover or FUNCTION FLUSH)."""
    return isinstance(exc, redis_errors.ResponseError) and "function not found" in f"{exc}".lower()


def functions_refused(exc: BaseException) -> bool:
    """FCALL or FUNCTION refused as a command: unknown to the server, or not allowed
    by the user's ACL (a key or channel the ACL refuses is another error)."""
    if not isinstance(exc, redis_errors.ResponseError):
        return False
    text = f"{exc}".lower()
    named = "'fcall'" in text or "'function" in text
    return named and ("unknown command" in text or "no permissions to run" in text)
