"""The SQLite backend's store (its blocking transaction code is in leasehold._shared.sqlite)."""

from leasehold._async.backends.sqlite.store import AsyncSQLiteStore, from_url

__all__ = ["AsyncSQLiteStore", "from_url"]
