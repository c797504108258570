from django.contrib import admin
from django.urls import path

from tests.djproject.audio import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("naive/<int:text_id>", views.naive_audio),
    path("once/<int:text_id>", views.once_audio),
]
