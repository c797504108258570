"""``leasehold.Lease``: a model with no table, for the admin page's permissions.

Leases live in the lease store, not in Django's database; this unmanaged model
only gives the admin a place in its index and the two permissions it checks:
``leasehold.view_lease`` (see the Leases page) and ``leasehold.break_lease``
(break a lease from it).
"""

from __future__ import annotations

from django.db import models


class Lease(models.Model):  # type: ignore[misc]
    name = models.CharField(max_length=255, primary_key=True)

    class Meta:
        managed = False
        db_table = "leasehold_lease_no_table"
        default_permissions = ("view",)
        permissions = (("break_lease", "Can break leases"),)
        verbose_name = "lease"
        verbose_name_plural = "leases"

    def __str__(self) -> str:
        return str(self.name)
