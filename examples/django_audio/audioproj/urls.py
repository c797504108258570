from django.urls import path

from audio import views

urlpatterns = [
    path("naive/<int:text_id>", views.naive),
    path("once/<int:text_id>", views.with_once),
    path("files/<int:text_id>", views.files),
]
