"""Name groups: ids become ``*``, the rest stays; a user rule replaces the default."""

from __future__ import annotations

import logging
import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import leasehold
from leasehold.naming import name_group, resolve

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("meeting:8f3a9c1e77d2", "meeting:*"),
        ("job:42", "job:*"),
        ("nightly-import", "nightly-import"),
        ("room:550e8400-e29b-41d4-a716-446655440000", "room:*"),
        ("ROOM:550E8400-E29B-41D4-A716-446655440000:chat", "ROOM:*:chat"),
        ("tenant:17:report:2026-05-01", "tenant:*:report:*-*-*"),
        ("cache:deadbeefcafe", "cache:deadbeefcafe"),  # hex-looking word, no digit
        ("blob:DEADBEEF1", "blob:*"),
        ("v2-migration", "v*-migration"),
        ("", ""),
    ],
)
def test_default_rule(name: str, group: str) -> None:
    assert name_group(name) == group


names = st.text(
    alphabet=st.sampled_from("abcdefxyz:-_/0123456789ABCDEF") | st.characters(), max_size=60
)
with_ids = st.builds(
    lambda a, u, b, n: f"{a}{u}{b}{n}",
    st.text(max_size=10),
    st.uuids().map(str),
    st.text(max_size=10),
    st.integers(min_value=0).map(str),
)


@given(names | with_ids)
def test_grouping_is_idempotent(name: str) -> None:
    assert name_group(name_group(name)) == name_group(name)


@given(names | with_ids)
def test_a_group_never_carries_a_digit_run_or_a_uuid(name: str) -> None:
    group = name_group(name)
    assert not re.search(r"[0-9]", group)
    assert not UUID_RE.search(group)


@given(st.lists(st.uuids(), min_size=1, max_size=20))
def test_ids_collapse_to_one_group(ids: list[uuid.UUID]) -> None:
    assert {name_group(f"meeting:{i}") for i in ids} == {"meeting:*"}
    assert {name_group(f"meeting:{i.hex}") for i in ids} == {"meeting:*"}


def test_a_user_rule_replaces_the_default() -> None:
    grouper = resolve(lambda name: name.split(":", 1)[0])
    assert grouper("user:alice") == "user"


def test_a_broken_user_rule_falls_back_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(name: str) -> str:
        raise RuntimeError("boom")

    grouper = resolve(broken)
    with caplog.at_level(logging.ERROR, logger="leasehold.naming"):
        assert grouper("job:1") == "job:*"
        assert grouper("job:2") == "job:*"
    assert len(caplog.records) == 1
    wrong = resolve(lambda name: 3)  # type: ignore[arg-type,return-value]
    assert wrong("job:7") == "job:*"


def test_a_rule_must_be_callable() -> None:
    with pytest.raises(leasehold.InvalidArgument):
        resolve("job:*")  # type: ignore[arg-type]
