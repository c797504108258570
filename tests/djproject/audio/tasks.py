"""A Django Task (django-tasks; ``django.tasks`` in Django 6) under a lease."""

from django_tasks import task

from leasehold.django import lock


@task()
@lock("task-meeting:{meeting_id}", ttl=30, when_busy="skip", on_skip="skipped")
def close_meeting(meeting_id: int) -> str:
    return f"closed {meeting_id}"
