"""The ``leasehold.django`` app: system checks, and a fresh client when the
``LEASEHOLD`` or ``DATABASES`` settings change (``override_settings`` in tests)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class LeaseholdConfig(AppConfig):  # type: ignore[misc]
    name = "leasehold.django"
    label = "leasehold"
    verbose_name = "Leases"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from leasehold.django import checks

        checks.register()
        setting_changed.connect(_settings_changed, dispatch_uid="leasehold.django.settings")


def _settings_changed(setting: str = "", **_: Any) -> None:
    if setting in ("LEASEHOLD", "DATABASES"):
        from leasehold.django import _client

        _client.reset()
