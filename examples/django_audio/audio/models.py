from django.db import models


class AudioFile(models.Model):
    text_id = models.IntegerField()
    path = models.CharField(max_length=200)
