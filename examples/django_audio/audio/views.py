"""Two requests for the same text's audio at the same moment.

``naive``: check, then create. Both requests see "no file yet" during the slow
synthesis, and both create one: two files, two bills from the TTS provider.

``with_once``: the same code under ``leasehold.django.once``. One request runs it;
the other waits for its result and gets the same file. Inside ``atomic()`` the
result is published when the transaction commits, so the waiting request never
gets an id whose row it cannot see yet.
"""

import time
import uuid

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from audio.models import AudioFile
from leasehold.django import once

SYNTHESIS_SECONDS = 0.5


def _find_or_create(text_id: int) -> int:
    found = AudioFile.objects.filter(text_id=text_id).first()
    if found is not None:
        return found.pk
    time.sleep(SYNTHESIS_SECONDS)  # the text-to-speech call
    path = f"/audio/{text_id}-{uuid.uuid4().hex[:8]}.mp3"
    return AudioFile.objects.create(text_id=text_id, path=path).pk


def naive(request: HttpRequest, text_id: int) -> JsonResponse:
    return JsonResponse({"id": _find_or_create(text_id)})


@once("audio:{text_id}", ttl=60)
def _audio_once(text_id: int) -> int:
    return _find_or_create(text_id)


def with_once(request: HttpRequest, text_id: int) -> JsonResponse:
    with transaction.atomic():
        return JsonResponse({"id": _audio_once(text_id)})


def files(request: HttpRequest, text_id: int) -> JsonResponse:
    ids = list(AudioFile.objects.filter(text_id=text_id).values_list("pk", flat=True))
    return JsonResponse({"ids": ids})
