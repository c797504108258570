"""The duplicate-creation race: two requests for the same text's audio at once.

``naive_audio`` checks, then creates (slowly, like a TTS call): both requests see
"none yet" and both create. ``once_audio`` runs the same code under
``leasehold.django.once``: one request creates, the other waits for it and gets
the same file.
"""

import time

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from leasehold.django import once
from tests.djproject.audio.models import AudioFile

SYNTHESIS_SECONDS = 0.5


def _create(text_id: int) -> int:
    found = AudioFile.objects.filter(text_id=text_id).first()
    if found is not None:
        return found.pk
    time.sleep(SYNTHESIS_SECONDS)  # the slow text-to-speech call
    return AudioFile.objects.create(text_id=text_id, path=f"/audio/{text_id}.mp3").pk


def naive_audio(request: HttpRequest, text_id: int) -> JsonResponse:
    return JsonResponse({"id": _create(text_id)})


@once("audio:{text_id}", ttl=30)
def _create_once(text_id: int) -> int:
    return _create(text_id)


def once_audio(request: HttpRequest, text_id: int) -> JsonResponse:
    with transaction.atomic():  # the result is published when this commits
        return JsonResponse({"id": _create_once(text_id)})
