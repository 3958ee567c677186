"""The registry on a real PostgreSQL server, started for this module on a Unix socket.

Skipped (with the reason) when the server programs (``initdb``, ``pg_ctl``) or the
``psycopg`` driver (``pip install '.[test]'``) are missing.  As root, the server runs as
the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from postgres_server import new_database_url, postgres_server

from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord
from alsiron.cohort.registry import Registry
from alsiron.errors import RegistryError

pytest.importorskip("psycopg", reason="psycopg not installed (pip install '.[test]')")

PORT = 55000 + os.getpid() % 400


@pytest.fixture(scope="module")
def server():
    with postgres_server(PORT) as root:
        yield root


@pytest.fixture
def url(server):
    return new_database_url(server, PORT)


def _record(subject="sub-01", session="ses-01", value=0.03, **kw):
    return SessionRecord(subject=subject, session=session,
                         acq_time=kw.pop("acq_time", "2025-03-01T09:00:00"),
                         indices={HEADLINE_INDEX: value}, parameters={"lambda": 1e-3}, **kw)


def test_round_trip_history_and_order_on_postgresql(url):
    with Registry.open(url) as reg:
        assert not reg.is_sqlite and reg.schema_version() == 1
        reg.record_session(_record(value=0.030))
        reg.record_session(_record(subject="sub-00", acq_time=None))
        reg.record_session(_record(session="ses-00", acq_time="2024-01-01T00:00:00"))
        reg.record_session(_record(value=0.031, qc_status="warn"))
    with Registry.open(url, create=False) as reg:
        current = reg.sessions()
        hist = reg.history("sub-01", "ses-01")
    assert [(r.subject, r.session) for r in current] == [
        ("sub-00", "ses-01"), ("sub-01", "ses-00"), ("sub-01", "ses-01")]
    assert current[2] == _record(value=0.031, qc_status="warn")
    assert [r.indices[HEADLINE_INDEX] for r in hist] == [0.030, 0.031]


def test_two_processes_writing_at_once_lose_nothing_on_postgresql(url):
    from test_registry import _writer_code

    Registry.open(url).close()
    n = 40
    env = dict(os.environ, PYTHONWARNINGS="error")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_writer_code()), tag,
                               url, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for tag in "ab"]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Registry.open(url) as reg:
        current = reg.sessions()
        shared = reg.history("sub-shared", "ses-01")
    assert len([r for r in current if r.subject != "sub-shared"]) == 2 * n
    assert len(shared) == 2 * n and sum(r.subject == "sub-shared" for r in current) == 1


def test_killed_mid_write_rolls_back_on_postgresql(url):
    with Registry.open(url) as reg:
        reg.record_session(_record(value=0.030))
    code = """
        import sys, time
        from alsiron.cohort import registry
        from alsiron.cohort.records import SessionRecord
        original = registry._insert_index_values
        def slow(conn, rows):
            original(conn, rows)
            print("inside", flush=True)
            time.sleep(60)
        registry._insert_index_values = slow
        with registry.Registry.open(sys.argv[1]) as reg:
            reg.record_session(SessionRecord(subject="sub-01", session="ses-01",
                                             indices={"chi_precentral_deep_mean": 0.099}))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    with Registry.open(url) as reg:      # the server rolled the dead session back
        assert [r.indices[HEADLINE_INDEX] for r in reg.sessions()] == [0.030]
        reg.record_session(_record(value=0.099))
        assert [r.indices[HEADLINE_INDEX] for r in reg.history("sub-01", "ses-01")] == \
            [0.030, 0.099]


def test_newer_schema_is_refused_on_postgresql(url):
    import sqlalchemy as sa

    Registry.open(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO schema_version VALUES (2, 'x', '9.0')")
    engine.dispose()
    with pytest.raises(RegistryError, match="schema version 2 is newer"):
        Registry.open(url)
