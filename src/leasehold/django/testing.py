"""``TEST_RUNNER = "leasehold.django.testing.DiscoverRunner"``.

With ``LEASEHOLD = {"DATABASE": ...}`` the store lives in the test database
while tests run; PostgreSQL refuses to drop a database with open sessions, so
this runner closes the process's leasehold client (releasing what it holds)
before Django drops the test databases. A project with its own runner calls
``leasehold.django.close()`` in its ``teardown_databases``.
"""

from __future__ import annotations

from typing import Any

from django.test.runner import DiscoverRunner as _DjangoRunner

from leasehold.django import _client


class DiscoverRunner(_DjangoRunner):  # type: ignore[misc]
    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        _client.reset()
        super().teardown_databases(old_config, **kwargs)
