"""Lua and SQL shipped with the package, each with a header comment stating its contract."""
