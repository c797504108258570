from django.db import models


class AudioFile(models.Model):
    text_id = models.IntegerField()
    path = models.CharField(max_length=200)

    class Meta:
        app_label = "audio"


class Ledger(models.Model):
    """Rows written under a lease, tagged with its fence."""

    name = models.CharField(max_length=100)
    fence = models.BigIntegerField()

    class Meta:
        app_label = "audio"
