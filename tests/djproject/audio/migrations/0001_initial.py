from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []  # noqa: RUF012
    operations = [  # noqa: RUF012
        migrations.CreateModel(
            name="AudioFile",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("text_id", models.IntegerField()),
                ("path", models.CharField(max_length=200)),
            ],
        ),
        migrations.CreateModel(
            name="Ledger",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
                ("fence", models.BigIntegerField()),
            ],
        ),
    ]
