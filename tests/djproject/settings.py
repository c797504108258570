"""Settings of the Django project tests/test_django.py runs Django's own test
runner on (in a subprocess, so no Django state leaks into other test modules).

The PostgreSQL server is the one the tests start: ``LH_DJ_PG_PORT``.
"""

import os

SECRET_KEY = "leasehold-tests-only"
USE_TZ = True
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.djproject.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "leasehold.django",
    "tests.djproject.audio",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("LH_DJ_PG_PORT", "5432"),
        "USER": "postgres",
        "NAME": os.environ.get("LH_DJ_PG_NAME", "postgres"),
        "TEST": {"NAME": "lh_django_test"},
    },
    "other": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("LH_DJ_SQLITE", ":memory:"),
    },
}
LEASEHOLD = {"DATABASE": "default"}
TASKS = {"default": {"BACKEND": "django_tasks.backends.immediate.ImmediateBackend"}}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"leasehold": {"handlers": ["console"], "level": "WARNING"}},
}
TEST_RUNNER = "leasehold.django.testing.DiscoverRunner"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
