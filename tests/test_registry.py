"""Results registry: round trip, history, concurrency, crash safety, damaged files."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from alsiron.cli import main
from alsiron.cohort import registry as regmod
from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord
from alsiron.cohort.registry import Registry, default_registry_path
from alsiron.errors import OutputExistsError, RegistryError
from alsiron.sim.cohort import simulate_index_cohort


def _record(subject: str = "sub-01", session: str = "ses-01", run: int = 1,
            value: float = 0.03, **kw) -> SessionRecord:
    return SessionRecord(subject=subject, session=session, run=run,
                         acq_time=kw.pop("acq_time", "2025-03-01T09:00:00"),
                         indices={HEADLINE_INDEX: value, "r2star_precentral_mean": 21.5},
                         input_checksums={"sub-01/anat/x.nii.gz": "ab" * 32},
                         software_version="0.1.0", parameters={"inversion": "tvadmm",
                                                               "lambda": 1e-3}, **kw)


def _child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="error")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_default_path_is_inside_the_alsiron_derivatives(tmp_path):
    expected = tmp_path / "derivatives" / "alsiron" / "registry.sqlite"
    assert default_registry_path(tmp_path / "derivatives") == expected
    assert default_registry_path(tmp_path / "derivatives" / "alsiron") == expected


def test_round_trip_ordering_and_nan(tmp_path):
    records, _ = simulate_index_cohort(4, 3, seed=2, repeat_fraction=0.5)
    records[0].indices["chi_precentral_L_mean"] = math.nan
    records[0].qc_notes = {"precentral_lost_to_mask": 0.12}
    with Registry.open(tmp_path / "r.sqlite") as reg:
        reg.record_sessions(reversed(records))
        back = reg.sessions()
        assert reg.sessions("sub-03") == [r for r in back if r.subject == "sub-03"]
    key = sorted(records, key=lambda r: (r.subject, r.acq_time, r.session, r.run))
    assert [(r.subject, r.session, r.run) for r in back] == \
        [(r.subject, r.session, r.run) for r in key]
    first = back[0]
    assert math.isnan(first.indices.pop("chi_precentral_L_mean"))
    records[0].indices.pop("chi_precentral_L_mean")
    assert first == records[0]
    assert back[1:] == key[1:]


def test_rerun_replaces_and_keeps_history(tmp_path):
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_session(_record(value=0.030))
        reg.record_session(_record(session="ses-02", value=0.031,
                                   acq_time="2025-09-01T09:00:00"))
        reg.record_session(_record(value=0.032, qc_status="warn"))
        reg.record_session(_record(value=0.033))
    with Registry.open(path, create=False) as reg:
        current = reg.sessions()
        hist = reg.history("sub-01", "ses-01")
    assert [r.indices[HEADLINE_INDEX] for r in current] == [0.033, 0.031]
    assert [r.indices[HEADLINE_INDEX] for r in hist] == [0.030, 0.032, 0.033]
    assert hist[1].qc_status == "warn"
    con = sqlite3.connect(path)
    rows = con.execute("select is_current, superseded_at is null from session_records "
                       "where session='ses-01' order by id").fetchall()
    con.close()
    assert rows == [(0, 0), (0, 0), (1, 1)]


def test_bad_records_are_refused_without_writing(tmp_path):
    with Registry.open(tmp_path / "r.sqlite") as reg:
        for bad in (_record(subject=""), _record(subject="sub\t1"), _record(run=0),
                    _record(qc_status="ok"), replace(_record(), indices={"chi_mean": 1.0})):
            with pytest.raises(ValueError):
                reg.record_sessions([_record(subject="sub-09"), bad])
        assert reg.sessions() == []


def _writer_code() -> str:
    return """
        import sys
        from alsiron.cohort.registry import Registry
        from alsiron.cohort.records import SessionRecord
        tag, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        with Registry.open(path) as reg:
            for i in range(n):
                # Own subjects, plus one shared key both processes keep replacing.
                reg.record_session(SessionRecord(subject=f"sub-{tag}{i:03d}", session="ses-01",
                                                 indices={"chi_precentral_mean": i * 1.0}))
                reg.record_session(SessionRecord(subject="sub-shared", session="ses-01",
                                                 parameters={"writer": tag, "i": i}))
        print("done")
    """


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry.open(path).close()
    n = 60
    procs = [_child(_writer_code(), tag, str(path), str(n)) for tag in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "done"
    with Registry.open(path) as reg:
        current = reg.sessions()
        shared = reg.history("sub-shared", "ses-01")
    own = [r for r in current if r.subject != "sub-shared"]
    assert len(own) == 2 * n
    assert {r.subject for r in own} == {f"sub-{t}{i:03d}" for t in "ab" for i in range(n)}
    assert len(shared) == 2 * n
    assert sum(r.subject == "sub-shared" for r in current) == 1
    # Each writer's own sequence is intact and in order within the shared history.
    for tag in "ab":
        assert [r.parameters["i"] for r in shared if r.parameters["writer"] == tag] == \
            list(range(n))


def test_killed_mid_write_leaves_registry_consistent_and_rerun_completes(tmp_path):
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_session(_record(value=0.030))
    code = """
        import sys, time
        from alsiron.cohort import registry
        from alsiron.cohort.records import SessionRecord
        original = registry._insert_index_values
        def slow(conn, rows):
            original(conn, rows)
            print("inside", flush=True)   # old row superseded and new rows written, uncommitted
            time.sleep(60)
        registry._insert_index_values = slow
        with registry.Registry.open(sys.argv[1]) as reg:
            reg.record_sessions([
                SessionRecord(subject="sub-01", session="ses-01",
                              indices={"chi_precentral_deep_mean": 0.099}),
                SessionRecord(subject="sub-02", session="ses-01")])
    """
    proc = _child(code, str(path))
    assert proc.stdout.readline().strip() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Registry.open(path) as reg:
        current = reg.sessions()
        assert [(r.subject, r.indices[HEADLINE_INDEX]) for r in current] == [("sub-01", 0.030)]
        assert len(reg.history("sub-01", "ses-01")) == 1
        # The rerun goes through (no stale lock) and replaces the record.
        reg.record_sessions([_record(value=0.099), _record(subject="sub-02")])
        assert [r.subject for r in reg.sessions()] == ["sub-01", "sub-02"]
        assert [r.indices[HEADLINE_INDEX] for r in reg.history("sub-01", "ses-01")] == \
            [0.030, 0.099]
    con = sqlite3.connect(path)
    assert con.execute("pragma integrity_check").fetchall() == [("ok",)]
    con.close()


def test_garbage_file_gives_a_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(RegistryError, match="not an SQLite database"):
        Registry.open(path)
    assert path.read_bytes() == b"this is not a database\n" * 100


def test_damaged_pages_give_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite"
    records, _ = simulate_index_cohort(40, 3, seed=0)
    with Registry.open(path) as reg:
        reg.record_sessions(records)
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * 4096
    data[2 * 4096:3 * 4096] = b"\xa5" * 4096   # overwrite a whole page in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="damaged|malformed"):
        with Registry.open(path) as reg:
            reg.sessions()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry.open(path).close()
    con = sqlite3.connect(path)
    con.execute("insert into schema_version values (?, '2030-01-01', '9.0')",
                (regmod.SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match=r"schema version 2 is newer.*upgrade alsiron"):
        Registry.open(path)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("create table patients (id integer)")
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="not an alsiron registry"):
        Registry.open(path)


def test_missing_registry_without_create(tmp_path):
    with pytest.raises(RegistryError, match="no registry here"):
        Registry.open(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_older_schema_is_migrated_keeping_data(tmp_path, monkeypatch):
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_session(_record())

    def add_note_column(conn):
        conn.exec_driver_sql("ALTER TABLE session_records ADD COLUMN reviewer TEXT")

    monkeypatch.setattr(regmod, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(regmod.MIGRATIONS, 1, add_note_column)
    with Registry.open(path) as reg:
        assert reg.schema_version() == 2
        assert reg.sessions() == [_record()]
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("pragma table_info(session_records)")]
    versions = con.execute("select version from schema_version order by version").fetchall()
    con.close()
    assert "reviewer" in cols and versions == [(1,), (2,)]


def test_postgresql_url_builds_an_engine_and_the_schema_compiles(monkeypatch):
    # No PostgreSQL server nor driver on this machine: check the engine construction with
    # a stand-in DBAPI module (pg8000's dialect imports nothing else at construction; the
    # psycopg dialects import their package) and that the DDL compiles for PostgreSQL.
    fake_dbapi = types.SimpleNamespace(paramstyle="format", __version__="1.31.0",
                                       Error=Exception)
    real_create = sa.create_engine
    monkeypatch.setattr(regmod.sa, "create_engine",
                        lambda url, **kw: real_create(url, module=fake_dbapi, **kw))
    engine = regmod._server_engine("postgresql+pg8000://alice:secret@db.example:5432/alsiron")
    assert engine.dialect.name == "postgresql"
    assert engine.url.database == "alsiron" and engine.url.host == "db.example"
    ddl = [str(sa.schema.CreateTable(t).compile(dialect=engine.dialect))
           for t in regmod.metadata.sorted_tables]
    index = str(sa.schema.CreateIndex(next(
        i for i in regmod.records_table.indexes if i.unique)).compile(dialect=engine.dialect))
    assert any("SERIAL" in d for d in ddl)
    assert "WHERE is_current" in index and "UNIQUE" in index
    engine.dispose()


def test_postgresql_without_driver_is_a_one_line_error(monkeypatch):
    def no_driver(*_a, **_k):
        raise ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")

    monkeypatch.setattr(regmod.sa, "create_engine", no_driver)
    with pytest.raises(RegistryError, match="needs the psycopg2 driver") as err:
        Registry.open("postgresql://alice:secret@db.example/alsiron")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_cli_export_writes_tsv_and_dictionary(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_session(_record())
        reg.record_session(_record(value=0.04))
        reg.record_session(_record(subject="sub-02"))
    out = tmp_path / "export" / "registry.tsv"
    assert main(["registry", "export", "--registry", str(path), str(out)]) == 0
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    assert len(lines) == 3 and header[:3] == ["subject", "session", "run"]
    row = dict(zip(header, lines[1].split("\t"), strict=True))
    assert float(row[HEADLINE_INDEX]) == 0.04 and row["sex"] == "n/a"
    assert (tmp_path / "export" / "registry.json").exists()
    assert main(["registry", "export", "--registry", str(path), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setenv("ALSIRON_REGISTRY", str(path))
    assert main(["registry", "export", "--all", "--overwrite", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4
    monkeypatch.delenv("ALSIRON_REGISTRY")
    assert main(["registry", "export", str(tmp_path / "x.tsv")]) == 2
    assert "no registry given" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        with Registry.open(path) as reg:
            reg.export_tsv(out)


def test_input_checksums_are_sha256_relative_to_the_dataset(tmp_path):
    import hashlib

    a = tmp_path / "sub-01" / "anat" / "a.nii.gz"
    a.parent.mkdir(parents=True)
    a.write_bytes(b"x" * (3 << 20))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"")
    sums = regmod.input_checksums([a, outside], root=tmp_path)
    assert sums == {"sub-01/anat/a.nii.gz": hashlib.sha256(b"x" * (3 << 20)).hexdigest(),
                    outside.resolve().as_posix(): hashlib.sha256(b"").hexdigest()}
    outside.unlink()
    with pytest.raises(regmod.InputError, match="cannot read"):
        regmod.input_checksums([tmp_path / "missing.nii.gz"])
