"""Results registry: one current record per processed (subject, session, run), with history.

The registry is a small relational database reached through SQLAlchemy Core:

* **SQLite** (default): one file, by default ``<dataset>/derivatives/alsiron/registry.sqlite``
  (:func:`default_registry_path`).  Opened in WAL mode with a busy timeout, and every
  write transaction starts with ``BEGIN IMMEDIATE``, so parallel workers on one machine
  queue for the write lock instead of failing.  WAL needs a local file system (not NFS/SMB).
* **PostgreSQL**: pass an SQLAlchemy URL (``postgresql://user@host/db``) where a site shares
  one server; writers serialise on a table lock.  Needs a driver (``psycopg2`` or
  ``psycopg``), which alsiron does not install.

Tables (schema version :data:`SCHEMA_VERSION`):

``schema_version``
    one row per applied migration (version, UTC time, alsiron version).
``session_records``
    one row per recorded run of a session; ``is_current`` marks the record in force,
    older ones keep ``superseded_at``.  A partial unique index allows one current row per
    (subject, session, run).  QC notes, input checksums and parameters are JSON text.
``index_values``
    (record id, index name, value); NaN is stored as NULL.

Replacing a record (:meth:`Registry.record_session`) is one transaction: mark the old row
superseded, insert the new row and its index values.  A crash or kill at any point leaves
either the old or the new record current, never both or neither.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

import alsiron
from alsiron.cohort.records import SessionRecord, index_units
from alsiron.errors import AlsironError, InputError, InvalidInputError, RegistryError

#: Schema version this alsiron writes; older registries are migrated on open.
SCHEMA_VERSION = 1
#: File name of the default SQLite registry inside the alsiron derivatives folder.
REGISTRY_FILE_NAME = "registry.sqlite"
#: Environment variable naming a registry when ``--registry`` is not given.
REGISTRY_ENV = "ALSIRON_REGISTRY"
#: How long a writer waits for another writer's lock before giving up, ms.
BUSY_TIMEOUT_MS = 60_000
#: One SQLite wait for the write lock inside :data:`BUSY_TIMEOUT_MS`; an interrupt lands
#: within about this long.
LOCK_POLL_MS = 200

_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Advisory-lock key that serialises schema migrations on PostgreSQL.
_PG_MIGRATION_LOCK = 0x414C5349
_LABEL = re.compile(r"^[^\t\n\r\x00]+$")

metadata = sa.MetaData()

schema_version_table = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.String(40), nullable=False),
    sa.Column("software_version", sa.String(64), nullable=False),
)

records_table = sa.Table(
    "session_records", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(128), nullable=False),
    sa.Column("session", sa.String(128), nullable=False),
    sa.Column("run", sa.Integer, nullable=False),
    sa.Column("acq_time", sa.String(40)),
    sa.Column("years_since_baseline", sa.Float),
    sa.Column("site", sa.String(128)),
    sa.Column("group_label", sa.String(64)),
    sa.Column("sex", sa.String(16)),
    sa.Column("age", sa.Float),
    sa.Column("field_strength_t", sa.Float),
    sa.Column("qc_status", sa.String(8), nullable=False),
    sa.Column("qc_notes", sa.Text, nullable=False),
    sa.Column("input_checksums", sa.Text, nullable=False),
    sa.Column("software_version", sa.String(64), nullable=False),
    sa.Column("parameters", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.String(40), nullable=False),
    sa.Column("superseded_at", sa.String(40)),
    sa.Column("is_current", sa.Boolean, nullable=False),
    sa.Index("ix_session_records_current_key", "subject", "session", "run", unique=True,
             sqlite_where=sa.text("is_current = 1"),
             postgresql_where=sa.text("is_current")),
    sa.Index("ix_session_records_key", "subject", "session", "run"),
)

index_values_table = sa.Table(
    "index_values", metadata,
    sa.Column("record_id", sa.Integer,
              sa.ForeignKey("session_records.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("value", sa.Float),
)


#: Marks the current record of a key superseded (statement built once, compiled once).
_SUPERSEDE = records_table.update().where(
    (records_table.c.subject == sa.bindparam("k_subject"))
    & (records_table.c.session == sa.bindparam("k_session"))
    & (records_table.c.run == sa.bindparam("k_run"))
    & records_table.c.is_current).values(is_current=False,
                                         superseded_at=sa.bindparam("k_now"))


def _migrate_0_to_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[records_table, index_values_table])


#: ``MIGRATIONS[v]`` brings a registry from schema ``v`` to ``v + 1`` (inside one
#: transaction; SQLite and PostgreSQL both have transactional DDL).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1}


def default_registry_path(derivatives_root: Path) -> Path:
    """Default SQLite registry of a dataset: ``<dataset>/derivatives/alsiron/registry.sqlite``.

    Parameters
    ----------
    derivatives_root : path
        Either the dataset's ``derivatives`` folder (the registry goes into its
        ``alsiron/`` sub-folder) or the alsiron derivatives folder itself (a folder named
        ``alsiron``, as returned by :func:`alsiron.io.derivatives.derivatives_root`), so both
        readings give the same file for the default layout.  With ``--out ELSEWHERE`` the
        registry lives in ``ELSEWHERE/alsiron/``.
    """
    root = Path(derivatives_root)
    if root.name == "alsiron":
        return root / REGISTRY_FILE_NAME
    return root / "alsiron" / REGISTRY_FILE_NAME


def input_checksums(paths: Iterable[str | os.PathLike[str]],
                    root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """SHA-256 hex digests of input files, keyed by path relative to ``root`` (POSIX form).

    For ``SessionRecord.input_checksums``: with the dataset root as ``root`` the keys stay
    valid when the dataset moves.  Files outside ``root`` keep their absolute path.

    Raises
    ------
    InputError
        A file cannot be read.
    """
    from alsiron.io.atomic import sha256_file
    from alsiron.io.derivatives import dataset_relative

    out = {}
    for p in paths:
        path = Path(p)
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise InputError(path, f"cannot read for its checksum: {exc.strerror}") from None
        out[dataset_relative(path, root)] = digest
    return dict(sorted(out.items()))


def resolve_location(option: str | os.PathLike[str] | None,
                     dataset_root: Path | None = None) -> str | Path:
    """Registry named by ``--registry``, else ``$ALSIRON_REGISTRY``, else the dataset default.

    Raises
    ------
    AlsironError
        None of the three is available.
    """
    if option is not None and str(option) != "":
        return option if _is_url(str(option)) else Path(option)
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return env if _is_url(env) else Path(env)
    if dataset_root is not None:
        return default_registry_path(Path(dataset_root) / "derivatives")
    raise AlsironError(f"no registry given: pass --registry PATH|URL or set {REGISTRY_ENV}")


def _is_url(location: str) -> bool:
    return "://" in location


def display_location(location: str | os.PathLike[str] | None) -> str:
    """A registry location as it may be shown to people and written to files.

    The one rendering of a registry location for stdout, logs, JSON, HTML and exports:
    a URL's password becomes ``***`` (``postgresql://user:***@host/db``); a file path is
    returned as it is.  A URL that SQLAlchemy cannot parse still has anything between
    ``//user:`` and ``@`` masked, so a malformed URL cannot leak its password either.
    """
    if location is None:
        return ""
    text = os.fspath(location)
    if not _is_url(text):
        return text
    try:
        return sa.engine.make_url(text).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return _URL_PASSWORD.sub(r"\1***@", text)


#: ``scheme://user:password@`` of a URL SQLAlchemy cannot parse (password group masked).
_URL_PASSWORD = re.compile(r"(//[^/:@]*:)[^@]*@")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _sqlite_engine(path: Path, *, create: bool) -> Engine:
    if path.exists():
        if not path.is_file():
            raise RegistryError(path, "is not a file (expected an SQLite registry)")
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise RegistryError(path, "is not an SQLite database (corrupted or not a "
                                      "registry); restore it from a backup or choose "
                                      "another --registry")
    elif not create:
        raise RegistryError(path, "no registry here (process a session first, or pass "
                                  "--registry PATH|URL)")
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(path, f"cannot create the registry's folder "
                                      f"({exc.strerror or exc})") from None
    read_only = not create and not _writable(path)
    if read_only:
        engine = sa.create_engine("sqlite://", creator=lambda: _read_only_connection(path))
    else:
        engine = sa.create_engine(f"sqlite:///{path}",
                                  connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level so that the "begin" hook below decides how each
        # transaction starts (the driver's own implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if read_only:
            cur.close()
            return
        # Outside any transaction (the mode cannot change inside one); persistent in the file.
        mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()
        cur.close()
        if mode is None or str(mode[0]).lower() != "wal":
            raise RegistryError(path, f"could not switch the registry to WAL mode (got {mode}); "
                                      "is it on a network file system?")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that reads and then
        # writes can fail at once with "database is locked" instead of waiting.
        if conn.get_execution_options().get("alsiron_write"):
            _begin_immediate(conn)
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _begin_immediate(conn: Connection) -> None:
    """Take SQLite's write lock, waiting up to :data:`BUSY_TIMEOUT_MS` for another writer.

    The wait is a Python loop of short SQLite waits (:data:`LOCK_POLL_MS`) rather than one
    long wait inside SQLite, where Ctrl-C (or SIGTERM) is not seen until it ends.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")
    try:
        while True:
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except sa.exc.OperationalError as exc:
                text = str(exc.orig) if exc.orig is not None else str(exc)
                if ("locked" not in text and "busy" not in text) \
                        or time.monotonic() >= deadline:
                    raise
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _server_engine(url: str) -> Engine:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise RegistryError(None, f"--registry {display_location(url)!r} is neither a file "
                                  "path nor an SQLAlchemy URL (e.g. postgresql://user@host/db)"
                            ) from None
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise RegistryError(None, f"registry backend {parsed.get_backend_name()!r} is not "
                                  "supported (use an SQLite file or postgresql://)")
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise RegistryError(None, "an in-memory SQLite registry would be lost; give a file")
        return _sqlite_engine(Path(parsed.database), create=True)
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise RegistryError(None, f"PostgreSQL registry {display_location(url)} needs the "
                                  f"{exc.name} driver: pip install 'psycopg[binary]' "
                                  "(postgresql://, postgresql+psycopg://) or psycopg2-binary "
                                  "(postgresql+psycopg2://)") from None


def _writable(path: Path) -> bool:
    """True when this process may write the registry file and its folder (WAL mode writes
    ``-wal`` and ``-shm`` files beside it, even to read)."""
    return os.access(path.parent, os.W_OK) and os.access(path, os.W_OK)


def _read_only_connection(path: Path) -> Any:
    """An SQLite connection that never writes: for a registry in a read-only folder
    (an archived dataset), where WAL mode cannot create its ``-shm`` file.

    Without a ``-wal`` file left beside it the file is opened ``immutable`` (no locks, no
    ``-shm``); with one, ``mode=ro`` so that the records it holds are read too.
    """
    import sqlite3
    from urllib.parse import quote

    wal = path.with_name(path.name + "-wal")
    flags = "mode=ro" if wal.exists() and wal.stat().st_size > 0 else "mode=ro&immutable=1"
    uri = f"file:{quote(str(path.resolve()))}?{flags}"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)


class Registry:
    """Handle on an opened registry; use :meth:`open` (also a context manager).

    Examples
    --------
    >>> with Registry.open(default_registry_path(dataset / "derivatives")) as reg:
    ...     reg.record_session(record)
    ...     current = reg.sessions("sub-01")
    """

    def __init__(self, engine: Engine, location: str | Path) -> None:
        self._engine: Engine | None = engine
        self.location = location

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, location: str | os.PathLike[str], *, create: bool = True) -> Registry:
        """Open (and create or migrate) a registry.

        Parameters
        ----------
        location : path or str
            An SQLite file path, or an SQLAlchemy URL (``postgresql://user@host/db``,
            ``sqlite:///path``).
        create : bool
            Create a missing SQLite file (and an empty schema on a server).  With False, a
            missing file is an error.

        Raises
        ------
        RegistryError
            Not a registry, corrupted, written by a newer alsiron (newer schema),
            locked for longer than the busy timeout, or no database driver.
        """
        if isinstance(location, str) and _is_url(location):
            engine = _server_engine(location)
            where: str | Path = location
        else:
            where = Path(location)
            engine = _sqlite_engine(where, create=create)
        reg = cls(engine, where)
        try:
            reg._check_and_migrate(create=create)
        except BaseException:
            engine.dispose()
            raise
        return reg

    def _error(self, problem: str) -> RegistryError:
        if isinstance(self.location, Path):
            return RegistryError(self.location, problem)
        return RegistryError(None, f"{display_location(self.location)}: {problem}")

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.OperationalError as exc:
            text = str(exc.orig) if exc.orig is not None else str(exc)
            if "locked" in text or "busy" in text:
                raise self._error(f"registry stayed locked by another writer for more than "
                                  f"{BUSY_TIMEOUT_MS / 1000:.0f} s ({text})") from None
            raise self._error(f"cannot use the registry: {text.splitlines()[0]}") from None
        except sa.exc.IntegrityError as exc:
            text = str(exc.orig) if exc.orig is not None else str(exc)
            raise self._error(f"write conflicted with another writer and was not stored "
                              f"({text.splitlines()[0]}); run it again") from None
        except sa.exc.DatabaseError as exc:
            text = str(exc.orig) if exc.orig is not None else str(exc)
            raise self._error(f"registry is damaged or not a registry: "
                              f"{text.splitlines()[0]}; restore it from a backup") from None

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (raises once closed)."""
        if self._engine is None:
            raise AlsironError(f"registry {display_location(self.location)} is closed")
        return self._engine

    @property
    def is_sqlite(self) -> bool:
        """True for a file registry."""
        return self.engine.dialect.name == "sqlite"

    def _write(self) -> Any:
        """Connection context for a write transaction (``with self._write() as conn``)."""
        return self.engine.connect().execution_options(alsiron_write=True)

    def _check_and_migrate(self, *, create: bool) -> None:
        with self._translate_errors():
            if self.is_sqlite:
                with self.engine.connect() as conn:
                    check = conn.exec_driver_sql("PRAGMA quick_check").scalars().all()
                    if check != ["ok"]:
                        raise self._error(f"registry is damaged ({'; '.join(check[:3])}); "
                                          "restore it from a backup")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise self._error(f"registry schema version {version} is newer than this "
                                  f"alsiron {alsiron.__version__} understands "
                                  f"(<= {SCHEMA_VERSION}); upgrade alsiron")
            if version == SCHEMA_VERSION:
                return
            if version == 0 and not create:
                raise self._error("empty database, not an alsiron registry")
            with self._write() as conn, conn.begin():
                if not self.is_sqlite:
                    # One migrating process at a time on a shared server.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                                 {"key": _PG_MIGRATION_LOCK})
                # Re-read under the write lock: another process may have migrated meanwhile.
                current = self._read_version(conn)
                while current < SCHEMA_VERSION:
                    MIGRATIONS[current](conn)
                    conn.execute(schema_version_table.insert().values(
                        version=current + 1, applied_at=_now(),
                        software_version=alsiron.__version__))
                    current += 1

    def _read_version(self, conn: Connection) -> int:
        inspector = sa.inspect(conn)
        tables = set(inspector.get_table_names())
        if "schema_version" not in tables:
            if tables:
                raise self._error("database has tables but no schema_version table: not an "
                                  "alsiron registry")
            metadata.create_all(conn, tables=[schema_version_table])
            return 0
        value = conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar()
        return int(value or 0)

    def schema_version(self) -> int:
        """Schema version stored in the registry (0 for an empty database)."""
        with self._translate_errors(), self.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in tables:
                if tables:
                    raise self._error("database has tables but no schema_version table: "
                                      "not an alsiron registry")
                return 0
            value = conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar()
            return int(value or 0)

    # ------------------------------------------------------------------ writing
    def record_session(self, record: SessionRecord) -> None:
        """Store ``record`` as the current record of its (subject, session, run).

        A previous current record is kept, marked superseded, in :meth:`history`; the
        replacement is one transaction.

        Raises
        ------
        ValueError
            Empty or multi-line labels, a run < 1, an unknown QC status or a malformed
            index name.
        RegistryError
            The registry cannot be written.
        """
        self.record_sessions([record])

    def check_record(self, record: SessionRecord) -> None:
        """Refuse, before any work, a record this registry cannot store: malformed labels,
        text longer than its column (PostgreSQL enforces ``VARCHAR(n)``; SQLite would
        accept it, so both are checked here alike), or a registry that cannot be reached
        or written (a trial insert, rolled back).

        Raises
        ------
        InvalidInputError
            A value the registry cannot hold, naming the field.
        RegistryError
            The registry cannot be reached or written.
        """
        row, _ = _record_row(record)
        for column in records_table.columns:
            limit = getattr(column.type, "length", None)
            value = row.get(column.name)
            if limit is not None and isinstance(value, str) and len(value) > limit:
                name = "group" if column.name == "group_label" else column.name
                raise InvalidInputError(
                    f"{record.subject} {record.session}: {name} {value[:20]!r}... is "
                    f"{len(value)} characters; the registry "
                    f"{display_location(self.location)} holds at most {limit}")
        with self._translate_errors(), self._write() as conn:
            trans = conn.begin()
            try:
                conn.execute(records_table.insert(), {
                    **row, "recorded_at": _now(), "superseded_at": None, "is_current": False})
            finally:
                trans.rollback()

    def has_transaction(self, subject: str, session: str, run: int, transaction: str) -> bool:
        """True when a record of (subject, session, run), current or superseded, was
        stored by the output transaction ``transaction``
        (``parameters["outputs"]["transaction"]``, :mod:`alsiron.io.transaction`)."""
        t = records_table
        where = ((t.c.subject == subject) & (t.c.session == session) & (t.c.run == run)
                 & t.c.parameters.contains(transaction))
        with self._translate_errors(), self.engine.connect() as conn:
            texts = conn.execute(sa.select(t.c.parameters).where(where)).scalars().all()
        for text in texts:
            outputs = json.loads(text).get("outputs")
            if isinstance(outputs, dict) and outputs.get("transaction") == transaction:
                return True
        return False

    def record_sessions(self, records: Iterable[SessionRecord]) -> None:
        """Store several records in one transaction (all or none), as :meth:`record_session`."""
        rows = [_record_row(r) for r in records]
        if not rows:
            return
        with self._translate_errors(), self._write() as conn, conn.begin():
            if not self.is_sqlite:
                # Serialise writers: without it two replacements of one key could both
                # insert a current row and the second would fail on the unique index.
                conn.exec_driver_sql("LOCK TABLE session_records IN SHARE ROW EXCLUSIVE MODE")
            now = _now()
            index_rows: list[dict[str, Any]] = []
            for row, values in rows:
                conn.execute(_SUPERSEDE, {"k_subject": row["subject"],
                                          "k_session": row["session"], "k_run": row["run"],
                                          "k_now": now})
                new_id = conn.execute(records_table.insert(), {
                    **row, "recorded_at": now, "superseded_at": None, "is_current": True}
                ).inserted_primary_key[0]
                index_rows += [{"record_id": new_id, "name": n, "value": v} for n, v in values]
            _insert_index_values(conn, index_rows)

    # ------------------------------------------------------------------ reading
    def sessions(self, subject: str | None = None) -> list[SessionRecord]:
        """Current records, ordered by subject, acquisition time (missing last), session, run."""
        where = records_table.c.is_current
        if subject is not None:
            where = where & (records_table.c.subject == subject)
        return self._select(where, current_order=True)

    def history(self, subject: str, session: str, run: int = 1) -> list[SessionRecord]:
        """Every record ever stored for (subject, session, run), oldest first (last = current)."""
        where = ((records_table.c.subject == subject) & (records_table.c.session == session)
                 & (records_table.c.run == run))
        return self._select(where, current_order=False)

    def rows(self, *, include_history: bool = False) -> list[dict[str, Any]]:
        """Raw rows (with ``id``, ``recorded_at``, ``superseded_at``, ``is_current`` and
        ``indices``), for export and audit."""
        where = sa.true() if include_history else records_table.c.is_current
        return self._select_rows(where, current_order=not include_history)

    def _select(self, where: Any, *, current_order: bool) -> list[SessionRecord]:
        return [_row_record(r) for r in self._select_rows(where, current_order=current_order)]

    def _select_rows(self, where: Any, *, current_order: bool) -> list[dict[str, Any]]:
        t = records_table
        if current_order:
            order = [t.c.subject, t.c.acq_time.is_(None), t.c.acq_time, t.c.session, t.c.run,
                     t.c.id]
        else:
            order = [t.c.id]
        with self._translate_errors(), self.engine.connect() as conn, conn.begin():
            rows = [dict(r._mapping) for r in conn.execute(sa.select(t).where(where)
                                                           .order_by(*order))]
            ids = [r["id"] for r in rows]
            indices: dict[int, dict[str, float]] = {i: {} for i in ids}
            iv = index_values_table
            if ids:
                query = sa.select(iv.c.record_id, iv.c.name, iv.c.value).join(
                    t, t.c.id == iv.c.record_id).where(where)
                for rid, name, value in conn.execute(query):
                    indices[rid][name] = math.nan if value is None else float(value)
        for r in rows:
            r["indices"] = dict(sorted(indices[r["id"]].items()))
        return rows

    # ------------------------------------------------------------------ export
    def export_tsv(self, path: Path, *, overwrite: bool = False,
                   include_history: bool = False) -> Path:
        """Write the current records (or every record) as a TSV with a JSON data dictionary.

        One row per record; one column per index name (``n/a`` where missing or NaN);
        QC notes, input checksums and parameters as JSON text.  The dictionary
        (``<path stem>.json``) gives each column's description and units.  Both files are
        written atomically.

        Returns
        -------
        Path
            ``path``.
        """
        from alsiron.io.atomic import atomic_path, save_json

        path = Path(path)
        dictionary_path = path.with_suffix(".json")
        rows = self.rows(include_history=include_history)
        names = sorted({n for r in rows for n in r["indices"]})
        fixed = ["subject", "session", "run", "acq_time", "years_since_baseline", "site",
                 "group", "sex", "age", "field_strength_t", "qc_status"]
        tail = ["qc_notes", "input_checksums", "software_version", "parameters",
                "recorded_at", "record_id"]
        if include_history:
            tail += ["is_current", "superseded_at"]
        lines = ["\t".join(fixed + names + tail)]
        for r in rows:
            rec = _row_record(r)
            cells: list[Any] = [getattr(rec, c) for c in fixed]
            cells += [rec.indices.get(n) for n in names]
            cells += [r["qc_notes"], r["input_checksums"], r["software_version"],
                      r["parameters"], r["recorded_at"], r["id"]]
            if include_history:
                cells += [bool(r["is_current"]), r["superseded_at"]]
            lines.append("\t".join(_tsv_cell(c) for c in cells))
        if dictionary_path.exists() and not overwrite:
            from alsiron.errors import OutputExistsError
            raise OutputExistsError(f"{dictionary_path}: already exists (use --overwrite)")
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        save_json(dictionary_path, _data_dictionary(names, include_history), overwrite=True)
        return path

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Release the database connections (idempotent)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({display_location(self.location)!r})"


# ---------------------------------------------------------------------- row mapping


def _check_label(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise InvalidInputError(f"SessionRecord.{name} must be a non-empty one-line string, "
                                f"got {value!r}")


def _json(obj: Any) -> str:
    from alsiron.io.atomic import _json_default

    return json.dumps(obj, sort_keys=True, default=_json_default, allow_nan=True)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _record_row(rec: SessionRecord) -> tuple[dict[str, Any], list[tuple[str, float | None]]]:
    _check_label("subject", rec.subject)
    _check_label("session", rec.session)
    if not isinstance(rec.run, int) or isinstance(rec.run, bool) or rec.run < 1:
        raise InvalidInputError(f"SessionRecord.run must be an integer >= 1, got {rec.run!r}")
    if rec.qc_status not in ("pass", "warn", "fail"):
        raise InvalidInputError(f"SessionRecord.qc_status must be pass, warn or fail, "
                                f"got {rec.qc_status!r}")
    for opt in ("acq_time", "site", "group", "sex"):
        value = getattr(rec, opt)
        if value is not None:
            _check_label(opt, value)
    values = []
    for name, value in rec.indices.items():
        index_units(name)  # raises ValueError on a malformed name
        values.append((name, _finite_or_none(value)))
    row = {
        "subject": rec.subject, "session": rec.session, "run": rec.run,
        "acq_time": rec.acq_time,
        "years_since_baseline": _finite_or_none(rec.years_since_baseline),
        "site": rec.site, "group_label": rec.group, "sex": rec.sex,
        "age": _finite_or_none(rec.age), "field_strength_t": _finite_or_none(rec.field_strength_t),
        "qc_status": rec.qc_status, "qc_notes": _json(rec.qc_notes),
        "input_checksums": _json(rec.input_checksums),
        "software_version": rec.software_version or "", "parameters": _json(rec.parameters),
    }
    return row, values


def _insert_index_values(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """All index values of a transaction in one executemany."""
    if rows:
        conn.execute(index_values_table.insert(), rows)


def _row_record(row: dict[str, Any]) -> SessionRecord:
    return SessionRecord(
        subject=row["subject"], session=row["session"], run=int(row["run"]),
        acq_time=row["acq_time"], years_since_baseline=row["years_since_baseline"],
        site=row["site"], group=row["group_label"], sex=row["sex"], age=row["age"],
        field_strength_t=row["field_strength_t"], indices=dict(row["indices"]),
        qc_status=row["qc_status"], qc_notes=json.loads(row["qc_notes"]),
        input_checksums=json.loads(row["input_checksums"]),
        software_version=row["software_version"], parameters=json.loads(row["parameters"]))


def _tsv_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else repr(value)
    text = str(value)
    # Labels are checked on the way in; JSON escapes its own control characters.
    return text.replace("\t", " ").replace("\n", " ")


def _data_dictionary(index_names: list[str], include_history: bool) -> dict[str, Any]:
    d: dict[str, Any] = {
        "subject": {"Description": "BIDS participant label (with sub- prefix)"},
        "session": {"Description": "BIDS session label (with ses- prefix)"},
        "run": {"Description": "Repeat scan within the session (1 = first; 2 = same-day "
                               "repeat used for the test-retest SD)"},
        "acq_time": {"Description": "Acquisition date-time, ISO 8601"},
        "years_since_baseline": {"Description": "Time since the participant's first session",
                                 "Units": "year"},
        "site": {"Description": "Acquisition site"},
        "group": {"Description": "Participant group (control, ALS, ...)"},
        "sex": {"Description": "Sex (M/F)"},
        "age": {"Description": "Age at this session", "Units": "year"},
        "field_strength_t": {"Description": "Scanner field strength", "Units": "T"},
        "qc_status": {"Description": "Overall QC verdict", "Levels": {
            "pass": "usable", "warn": "usable with caution", "fail": "not usable"}},
    }
    for name in index_names:
        d[name] = {"Description": f"Index {name} (map_region_statistic)",
                   "Units": index_units(name)}
    d.update({
        "qc_notes": {"Description": "Machine-readable QC reasons (JSON)"},
        "input_checksums": {"Description": "Input file -> SHA-256 (JSON)"},
        "software_version": {"Description": "alsiron version that made the record"},
        "parameters": {"Description": "Every algorithm and parameter of the run (JSON)"},
        "recorded_at": {"Description": "When the record was written to the registry, UTC"},
        "record_id": {"Description": "Registry row id (increases with every write)"},
    })
    if include_history:
        d["is_current"] = {"Description": "True for the record in force"}
        d["superseded_at"] = {"Description": "When a newer record replaced this one, UTC"}
    return d
