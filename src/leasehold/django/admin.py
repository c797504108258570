"""The admin's read-only "Leases" page, with a break action for the permitted.

Lists what the lease store holds now (``client().leases()``): name, holders,
fences, owners, hosts, held for, expires in. Users with ``leasehold.break_lease``
get a Break button, which asks for confirmation, then calls
``client().break_lease(name)``.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from leasehold._errors import LeaseholdError
from leasehold.django import _client
from leasehold.django.models import Lease

BREAK_PERMISSION = "leasehold.break_lease"


@admin.register(Lease)
class LeaseAdmin(admin.ModelAdmin):  # type: ignore[misc]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[Any]:
        return [
            path(
                "", self.admin_site.admin_view(self.leases_view), name="leasehold_lease_changelist"
            ),
            path(
                "break/",
                self.admin_site.admin_view(self.break_view),
                name="leasehold_lease_break",
            ),
        ]

    def _context(self, request: HttpRequest, **extra: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Leases",
            "can_break": request.user.has_perm(BREAK_PERMISSION),
            **extra,
        }

    def leases_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        prefix = request.GET.get("q", "")
        error = None
        try:
            leases = _client.get_client().leases(prefix)
        except LeaseholdError as exc:  # show the store's trouble, never a 500
            leases, error = [], str(exc)
        return TemplateResponse(
            request,
            "admin/leasehold/leases.html",
            self._context(request, leases=leases, prefix=prefix, error=error),
        )

    def break_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm(BREAK_PERMISSION):
            raise PermissionDenied
        name = request.POST.get("name") or request.GET.get("name") or ""
        back = reverse("admin:leasehold_lease_changelist")
        if request.method != "POST" or request.POST.get("confirm") != "yes":
            try:
                holders = _client.get_client().holders(name) if name else []
            except LeaseholdError as exc:
                messages.error(request, str(exc))
                return HttpResponseRedirect(back)
            return TemplateResponse(
                request,
                "admin/leasehold/break.html",
                self._context(request, name=name, holders=holders, title="Break a lease"),
            )
        try:
            removed = _client.get_client().break_lease(name)
        except LeaseholdError as exc:
            messages.error(request, f"could not break {name!r}: {exc}")
        else:
            messages.success(request, f"broke {name!r}: {removed} holder(s) removed")
        return HttpResponseRedirect(back)
