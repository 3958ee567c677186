"""A throw-away PostgreSQL server for tests: started on a Unix socket in a temporary
folder (as root it runs as the ``postgres`` user, since PostgreSQL refuses root), and
one fresh database per call of :func:`new_database_url`.  Skips the calling test where
``initdb``/``pg_ctl``, ``psycopg`` or (as root) ``runuser`` and a ``postgres`` user are
missing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no 'postgres' user to run the server")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser")
    return [runuser, "-u", "postgres", "--"]


@contextmanager
def postgres_server(port: int) -> Iterator[Path]:
    """Run a server listening on ``port`` (Unix socket only) for the ``with`` block;
    yields its socket folder, stops it (immediate) and removes its files after."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install '.[test]')")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not on PATH")
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="alsiron-pg-"))
    if prefix:
        shutil.chown(root, user="postgres")
    data = root / "data"
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "alsiron",
                    "--no-sync"], check=True, capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses='' -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield root
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_database_url(server: Path, port: int) -> str:
    """A new, empty database on the server and its SQLAlchemy URL."""
    import psycopg

    name = f"reg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"host={server} port={port} user=alsiron dbname=postgres",
                         autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://alsiron@/{name}?host={server}&port={port}"
