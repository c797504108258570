"""Django's own test runner runs these (tests/test_django.py starts it against a
real PostgreSQL). TransactionTestCase: on_commit behaviour needs real commits."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from typing import Any

import psycopg2
from django.core import checks
from django.db import connection, connections, transaction
from django.test import Client as HttpClient
from django.test import TransactionTestCase, override_settings

import leasehold
import leasehold.fence
from leasehold.django import client, lock, once, store_url
from leasehold.django.signals import lease_skipped
from tests.djproject.audio.models import AudioFile, Ledger


def unique(stem: str) -> str:
    return f"{stem}:{uuid.uuid4().hex[:8]}"


def held(name: str) -> bool:
    return bool(client().holders(name))


class SettingsTests(TransactionTestCase):
    def test_store_is_built_from_the_databases_alias(self) -> None:
        url = store_url()
        self.assertTrue(url.endswith(f"@127.0.0.1:{os.environ['LH_DJ_PG_PORT']}/lh_django_test"))
        self.assertTrue(client().store.capabilities.cross_host)
        with client().lock(unique("settings")) as lease:
            self.assertGreater(lease.fence, 0)

    def test_one_client_per_process(self) -> None:
        self.assertIs(client(), client())

    def test_a_forked_child_builds_its_own_client(self) -> None:
        parent = client()
        with parent.lock(unique("parent")) as held_by_parent:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report, then leave without running finalizers
                try:
                    child = client()
                    with child.lock(unique("child")) as lease:
                        answer = f"{child is not parent} {lease.fence > 0}"
                except BaseException as exc:
                    answer = f"error {exc!r}"
                os.write(write, answer.encode())
                os._exit(0)
            os.close(write)
            _, status = os.waitpid(pid, 0)
            answer = os.read(read, 1000).decode()
            os.close(read)
            self.assertEqual((status, answer), (0, "True True"))
            self.assertTrue(held_by_parent.held)  # the child never touched it
        self.assertIs(client(), parent)

    def test_settings_change_builds_a_new_client(self) -> None:
        first = client()
        with override_settings(LEASEHOLD={"URL": f"memory://{uuid.uuid4().hex}"}):
            self.assertTrue(store_url().startswith("memory://"))
            self.assertIsNot(client(), first)
        self.assertTrue(store_url().endswith("/lh_django_test"))

    def test_pgbouncer_sign_means_transaction_pooling(self) -> None:
        from leasehold.django.conf import database_url

        url = database_url(
            {
                "ENGINE": "django.db.backends.postgresql",
                "HOST": "db",
                "NAME": "app",
                "PASSWORD": "s3cret",
                "DISABLE_SERVER_SIDE_CURSORS": True,
                "OPTIONS": {"sslmode": "verify-full", "isolation_level": 1},
            }
        )
        self.assertIn("pooler=transaction", url)
        self.assertIn("sslmode=verify-full", url)
        self.assertNotIn("isolation_level", url)
        self.assertNotIn("s3cret", leasehold.Client(url).url)

    def test_deploy_check_reports_a_host_local_default(self) -> None:
        with override_settings(LEASEHOLD=None):
            errors = checks.run_checks(include_deployment_checks=True, tags=["leasehold"])
            self.assertEqual([e.id for e in errors], ["leasehold.E002"])
        errors = checks.run_checks(include_deployment_checks=True, tags=["leasehold"])
        self.assertEqual(errors, [])
        with override_settings(LEASEHOLD={"URL": "sqlite:///tmp/x.db"}):
            errors = checks.run_checks(include_deployment_checks=True, tags=["leasehold"])
            self.assertEqual([e.id for e in errors], ["leasehold.W001"])
        with override_settings(LEASEHOLD={"DATABASE": "nope"}):
            errors = checks.run_checks(tags=["leasehold"])
            self.assertEqual([e.id for e in errors], ["leasehold.E001"])


class LockTests(TransactionTestCase):
    def test_template_from_arguments_and_skip_is_told(self) -> None:
        seen: list[str] = []
        skipped: list[dict[str, Any]] = []
        prefix = unique("meeting")

        @lock(prefix + ":{meeting_id}", when_busy="skip", on_skip="skipped")
        def close(meeting_id: int) -> str:
            seen.append(client().holders(f"{prefix}:{meeting_id}")[0].name)
            return "closed"

        def on_skip(sender: Any, **kw: Any) -> None:
            skipped.append(kw)

        lease_skipped.connect(on_skip)
        try:
            self.assertEqual(close(7), "closed")
            self.assertEqual(seen, [f"{prefix}:7"])
            with client().lock(f"{prefix}:8"):
                with self.assertLogs("leasehold.django", "INFO") as logs:
                    self.assertEqual(close(meeting_id=8), "skipped")
            self.assertEqual([s["name"] for s in skipped], [f"{prefix}:8"])
            self.assertIn("skipped", logs.output[0])
        finally:
            lease_skipped.disconnect(on_skip)

    def test_raise_and_wait(self) -> None:
        name = unique("job")
        with client().lock(name):
            with self.assertRaises(leasehold.AcquireTimeout):
                with lock(name, when_busy="raise"):
                    pass
            with self.assertRaises(leasehold.AcquireTimeout):
                with lock(name, when_busy="wait", timeout=0.2):
                    pass
        with lock(name) as lease:
            self.assertIsNotNone(lease)

    def test_one_lock_object_entered_by_several_threads(self) -> None:
        shared = lock(unique("shared"), when_busy="wait", timeout=30)
        inside: list[int] = []
        errors: list[BaseException] = []

        def enter(i: int) -> None:
            try:
                with shared as lease:
                    assert lease is not None
                    inside.append(i)
                    self.assertEqual(len(client().holders(lease.name)), 1)
            except BaseException as exc:
                errors.append(exc)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=enter, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual((errors, sorted(inside)), ([], [0, 1, 2, 3]))

    def test_release_waits_for_the_commit(self) -> None:
        name = unique("tx")
        with transaction.atomic():
            with lock(name) as lease:
                assert lease is not None
                Ledger.objects.create(name=name, fence=lease.fence)
            self.assertTrue(held(name), "released before the commit")
        self.assertFalse(held(name))
        self.assertTrue(lease.released)

    def test_rollback_releases_at_once(self) -> None:
        name = unique("rb")
        with self.assertRaises(RuntimeError), transaction.atomic():
            with lock(name):
                pass
            self.assertTrue(held(name))
            raise RuntimeError("roll back")
        self.assertFalse(held(name))
        # A savepoint rolled back inside a committed transaction ends it too.
        with transaction.atomic():
            with self.assertRaises(RuntimeError), transaction.atomic():
                with lock(name):
                    pass
                raise RuntimeError("inner")
            self.assertFalse(held(name))

    def test_on_commit_false_releases_inside(self) -> None:
        name = unique("now")
        with transaction.atomic():
            with lock(name, on_commit=False):
                pass
            self.assertFalse(held(name))

    def test_django_task_with_a_lock(self) -> None:
        from tests.djproject.audio import tasks

        result = tasks.close_meeting.enqueue(41)
        self.assertEqual(result.return_value, "closed 41")
        with client().lock("task-meeting:42"):
            result = tasks.close_meeting.enqueue(42)
        self.assertEqual(result.return_value, "skipped")


class AsyncAndLossTests(TransactionTestCase):
    def test_async_function_under_lock_and_once(self) -> None:
        import asyncio

        prefix = unique("async")
        seen: list[str] = []
        runs: list[int] = []

        @lock(prefix + ":{n}", when_busy="skip", on_skip="skipped")
        async def job(n: int) -> str:
            seen.append(client().holders(f"{prefix}:{n}")[0].name)
            await asyncio.sleep(0.01)
            return f"done {n}"

        @once(prefix + ":once:{n}")
        async def build(n: int) -> int:
            runs.append(n)
            await asyncio.sleep(0.3)
            return n * 10

        async def main() -> tuple[Any, ...]:
            first = await job(1)
            with client().lock(f"{prefix}:2"):
                busy = await job(2)
            both = await asyncio.gather(build(3), build(3))
            return first, busy, both

        first, busy, both = asyncio.run(main())
        self.assertEqual((first, busy, list(both)), ("done 1", "skipped", [30, 30]))
        self.assertEqual((seen, runs), ([f"{prefix}:1"], [3]))

    def test_a_lease_lost_during_the_block_raises_lease_lost(self) -> None:
        import time

        name = unique("lost")
        with self.assertRaises(leasehold.LeaseLost), lock(name, ttl=1.0) as lease:
            assert lease is not None
            client().break_lease(name)
            deadline = time.monotonic() + 10
            while lease.held and time.monotonic() < deadline:
                time.sleep(0.05)  # the next renewal finds it broken
        self.assertFalse(held(name))


class OnceTests(TransactionTestCase):
    def test_result_published_on_commit(self) -> None:
        key = unique("report")
        calls: list[int] = []

        @once(key)
        def build() -> int:
            calls.append(1)
            return 42

        with transaction.atomic():
            self.assertEqual(build(), 42)
            self.assertTrue(held("once:" + key))  # duplicates still wait
            self.assertEqual(client().once(key).state(), "running")
        self.assertEqual(client().once(key).result(), 42)
        self.assertEqual(build(), 42)
        self.assertEqual(calls, [1])

    def test_rolled_back_run_never_happened(self) -> None:
        key = unique("rolled")
        calls: list[int] = []

        @once(key)
        def build() -> int:
            calls.append(1)
            return len(calls)

        with self.assertRaises(RuntimeError), transaction.atomic():
            build()
            raise RuntimeError("roll back")
        self.assertFalse(held("once:" + key))
        self.assertEqual(build(), 2)  # runs again: the first run was rolled back
        self.assertEqual(build(), 2)


class FenceTests(TransactionTestCase):
    databases = {"default", "other"}  # noqa: RUF012 -- Django's own attribute

    def test_django_sqlite_connection(self) -> None:
        name = unique("sqlite")
        other = connections["other"]
        with transaction.atomic(using="other"):
            self.assertEqual(leasehold.fence.check(other, name, 4), 4)
        with self.assertRaises(leasehold.StaleFence), transaction.atomic(using="other"):
            leasehold.fence.check(other, name, 3)
        with self.assertRaises(leasehold.InvalidArgument) as caught:
            leasehold.fence.check(other, name, 5)  # autocommit: outside atomic()
        self.assertIn("transaction.atomic()", str(caught.exception))

    def test_django_connections_inside_atomic(self) -> None:
        name = unique("fence")
        with transaction.atomic():
            self.assertEqual(leasehold.fence.check(connection, name, 5), 5)
        with transaction.atomic(using="default"):
            self.assertEqual(leasehold.fence.check(connections["default"], name, 6), 6)

    def test_outside_atomic_names_transaction_atomic(self) -> None:
        with self.assertRaises(leasehold.InvalidArgument) as caught:
            leasehold.fence.check(connection, unique("fence"), 1)
        self.assertIn("transaction.atomic()", str(caught.exception))

    def test_stale_fence_rolls_back_the_orm_writes(self) -> None:
        name = unique("ledger")
        with transaction.atomic():
            leasehold.fence.check(connection, name, 10)
            Ledger.objects.create(name=name, fence=10)
        with self.assertRaises(leasehold.StaleFence), transaction.atomic():
            Ledger.objects.create(name=name, fence=9)  # written before the check
            leasehold.fence.check(connection, name, 9)
        # Even a caller that catches StaleFence inside atomic() cannot commit.
        with transaction.atomic():
            Ledger.objects.create(name=name, fence=8)
            with contextlib.suppress(leasehold.StaleFence):
                leasehold.fence.check(connection, name, 8)
        self.assertEqual(
            list(Ledger.objects.filter(name=name).values_list("fence", flat=True)), [10]
        )

    def test_real_lease_fences_a_django_write(self) -> None:
        name = unique("real")
        first = client().lock(name).acquire()
        client().break_lease(name)  # a successor takes over
        with client().lock(name) as second, transaction.atomic():
            leasehold.fence.check(connection, name, second.fence)
            Ledger.objects.create(name=name, fence=second.fence)
        with self.assertRaises(leasehold.StaleFence), transaction.atomic():
            leasehold.fence.check(connection, name, first.fence)
            Ledger.objects.create(name=name, fence=first.fence)
        self.assertEqual(Ledger.objects.filter(name=name).count(), 1)

    def test_psycopg2_connection(self) -> None:
        params = connection.get_connection_params()
        conn = psycopg2.connect(
            host=params["host"], port=params["port"], user=params["user"], dbname=params["dbname"]
        )
        try:
            name = unique("pg2")
            with conn:
                self.assertEqual(leasehold.fence.check(conn, name, 3), 3)
            with self.assertRaises(leasehold.StaleFence), conn:
                leasehold.fence.check(conn, name, 2)
            conn.autocommit = True
            with self.assertRaises(leasehold.InvalidArgument):
                leasehold.fence.check(conn, name, 4)
        finally:
            conn.close()


class RaceTests(TransactionTestCase):
    def _twice(self, path: str) -> list[int]:
        ids: list[int] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def request() -> None:
            try:
                barrier.wait(10)
                response = HttpClient().get(path)
                ids.append(response.json()["id"])
            except BaseException as exc:
                errors.append(exc)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=request) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        return ids

    def test_naive_view_creates_two_files(self) -> None:
        ids = self._twice("/naive/1")
        self.assertEqual(len(set(ids)), 2)  # the race this library removes
        self.assertEqual(AudioFile.objects.filter(text_id=1).count(), 2)

    def test_once_view_creates_one_and_returns_it_to_both(self) -> None:
        ids = self._twice("/once/2")
        self.assertEqual(len(ids), 2)
        self.assertEqual(len(set(ids)), 1)
        self.assertEqual(AudioFile.objects.filter(text_id=2).count(), 1)


class AdminTests(TransactionTestCase):
    def _user(self, username: str, *perms: str) -> Any:
        from django.contrib.auth.models import Permission, User

        user = User.objects.create_user(username, password="pw", is_staff=True)
        for perm in perms:
            user.user_permissions.add(Permission.objects.get(codename=perm))
        web = HttpClient()
        web.force_login(user)
        return web

    def test_staff_without_permission_is_refused(self) -> None:
        web = self._user("nobody")
        self.assertEqual(web.get("/admin/leasehold/lease/").status_code, 403)

    def test_view_permission_lists_live_leases_without_break(self) -> None:
        name = unique("admin")
        web = self._user("viewer", "view_lease")
        with client().lock(name) as lease:
            page = web.get("/admin/leasehold/lease/")
            self.assertEqual(page.status_code, 200)
            body = page.content.decode()
            self.assertIn(name, body)
            self.assertIn(f"<td>{lease.fence}</td>", body)
            self.assertNotIn("Break", body)
            refused = web.post("/admin/leasehold/lease/break/", {"name": name, "confirm": "yes"})
            self.assertEqual(refused.status_code, 403)
            self.assertTrue(lease.held)

    def test_break_permission_breaks_after_confirmation(self) -> None:
        name = unique("admin")
        web = self._user("breaker", "view_lease", "break_lease")
        lease = client().lock(name).acquire()
        self.assertIn("Break", web.get("/admin/leasehold/lease/").content.decode())
        confirm = web.get("/admin/leasehold/lease/break/", {"name": name})
        self.assertEqual(confirm.status_code, 200)
        self.assertIn("Yes, break it", confirm.content.decode())
        self.assertTrue(held(name))  # asking changes nothing
        done = web.post("/admin/leasehold/lease/break/", {"name": name, "confirm": "yes"})
        self.assertEqual(done.status_code, 302)
        self.assertFalse(held(name))
        with client().lock(name) as successor:
            self.assertGreater(successor.fence, lease.fence)
        lease.release()

    def test_index_lists_the_leases_page(self) -> None:
        from django.contrib.auth.models import User

        User.objects.create_superuser("root", password="pw")
        web = HttpClient()
        web.force_login(User.objects.get(username="root"))
        self.assertIn("/admin/leasehold/lease/", web.get("/admin/").content.decode())
