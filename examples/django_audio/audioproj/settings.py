"""Settings of the duplicate-creation example.

The database comes from libpq's environment variables (PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE); leasehold's store is the same database
(``LEASEHOLD = {"DATABASE": "default"}``).
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "audioproj.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "leasehold.django",
    "audio",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "NAME": os.environ.get("PGDATABASE", "audio"),
    }
}
LEASEHOLD = {"DATABASE": "default"}
TEST_RUNNER = "leasehold.django.testing.DiscoverRunner"
