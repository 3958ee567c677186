"""Registry benchmark: inserts and queries for 10 000 sessions (``--quick``: 1 000).

Rows follow bench/run.py's format, with ``rust_ms`` holding the alsiron registry's time
(SQLAlchemy Core on SQLite, WAL, one fsync'd transaction per write) and ``numpy_ms`` a
plain ``sqlite3`` twin doing the same SQL without SQLAlchemy (where one is meaningful),
so ``ratio`` = twin / registry; ``throughput`` is in M records/s.
Each session carries 20 indices, QC notes, 4 input checksums and a parameter dictionary.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import row  # noqa: E402

from alsiron.cohort.records import SessionRecord  # noqa: E402
from alsiron.cohort.registry import Registry  # noqa: E402

_REGIONS = ("precentral", "precentral_L", "precentral_R", "precentral_deep",
            "precentral_L_hand_deep")


def _records(n: int) -> list[SessionRecord]:
    names = [f"{m}_{r}_{s}" for m in ("chi", "r2star") for r in _REGIONS
             for s in ("mean", "p90")]
    out = []
    for i in range(n):
        subject, visit = divmod(i, 5)
        out.append(SessionRecord(
            subject=f"sub-{subject:04d}", session=f"ses-{visit + 1:02d}",
            acq_time=f"20{25 + visit // 2}-{1 + (visit % 2) * 6:02d}-15T09:00:00",
            years_since_baseline=visit * 0.5, site=f"site-{subject % 3:02d}",
            group="ALS" if subject % 2 else "control", sex="MF"[subject % 2], age=60.0,
            field_strength_t=3.0,
            indices={n_: 0.03 + 1e-6 * (i + k) for k, n_ in enumerate(names)},
            qc_notes={"precentral_lost_to_mask": 0.01},
            input_checksums={f"sub-{subject:04d}/anat/echo-{e}.nii.gz": "ab" * 32
                             for e in range(1, 5)},
            software_version="0.1.0",
            parameters={"inversion": "tvadmm", "bfr": "pdf", "lambda": 1e-3,
                        "echoes": 6, "mask": {"method": "magnitude", "erode_mm": 2}}))
    return out


def _twin_insert(path: Path, records: list[SessionRecord]) -> None:
    """The same rows with sqlite3 alone, one transaction."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("create table r (id integer primary key, subject, session, run, acq_time, "
                "years, site, grp, sex, age, fs, qc, notes, sums, sw, params, rec, sup, cur)")
    con.execute("create table v (record_id, name, value, primary key (record_id, name))")
    con.execute("BEGIN IMMEDIATE")
    for r in records:
        cur = con.execute("insert into r values (null,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1)", (
            r.subject, r.session, r.run, r.acq_time, r.years_since_baseline, r.site, r.group,
            r.sex, r.age, r.field_strength_t, r.qc_status, json.dumps(r.qc_notes),
            json.dumps(r.input_checksums), r.software_version, json.dumps(r.parameters),
            "now", None))
        con.executemany("insert into v values (?,?,?)",
                        [(cur.lastrowid, k, v) for k, v in r.indices.items()])
    con.execute("COMMIT")
    con.close()


def _twin_read(path: Path) -> int:
    con = sqlite3.connect(path)
    rows = con.execute("select * from r where cur order by subject, acq_time").fetchall()
    vals = con.execute("select record_id, name, value from v").fetchall()
    by: dict[int, dict[str, float]] = {}
    for rid, name, value in vals:
        by.setdefault(rid, {})[name] = value
    out = [(r, by.get(r[0]), json.loads(r[12]), json.loads(r[15])) for r in rows]
    con.close()
    return len(out)


def _row(kernel: str, shape: str, seconds: float, twin_seconds: float, count: int) -> dict:
    out = row(kernel, shape, seconds, twin_seconds, count)
    out["records_per_s"] = round(count / seconds) if seconds > 0 else float("nan")
    return out


def run(quick: bool = False) -> list[dict]:
    n = 1000 if quick else 10_000
    n_single = 200 if quick else 1000
    records = _records(n)
    label = f"{n} sessions x 20 indices"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # One transaction per session, as parallel workers write.
        with Registry.open(tmp / "single.sqlite") as reg:
            t0 = time.perf_counter()
            for r in records[:n_single]:
                reg.record_session(r)
            t_single = time.perf_counter() - t0
        rows.append(_row("registry record_session (1 txn each)", f"{n_single} sessions",
                        t_single, float("nan"), n_single))
        path = tmp / "bulk.sqlite"
        t0 = time.perf_counter()
        with Registry.open(path) as reg:
            reg.record_sessions(records)
        t_bulk = time.perf_counter() - t0
        t0 = time.perf_counter()
        _twin_insert(tmp / "twin.sqlite", records)
        t_twin = time.perf_counter() - t0
        rows.append(_row("registry record_sessions (1 txn)", label, t_bulk, t_twin, n))
        # Re-running every session: replace + keep history.
        t0 = time.perf_counter()
        with Registry.open(path) as reg:
            reg.record_sessions(records)
        rows.append(_row("registry replace all (history kept)", label,
                        time.perf_counter() - t0, float("nan"), n))
        t0 = time.perf_counter()
        reg = Registry.open(path, create=False)
        t_open = time.perf_counter() - t0
        rows.append(_row("registry open (quick_check, schema)", f"{2 * n} rows", t_open,
                        float("nan"), 2 * n))
        t0 = time.perf_counter()
        current = reg.sessions()
        t_read = time.perf_counter() - t0
        assert len(current) == n
        t0 = time.perf_counter()
        assert _twin_read(tmp / "twin.sqlite") == n
        rows.append(_row("registry sessions() all current", label, t_read,
                        time.perf_counter() - t0, n))
        subjects = sorted({r.subject for r in records})[:: max(1, n // 500)]
        t0 = time.perf_counter()
        for s in subjects:
            reg.sessions(s)
        t_subj = (time.perf_counter() - t0) / len(subjects)
        rows.append(_row("registry sessions(subject)", "5 sessions", t_subj, float("nan"), 5))
        t0 = time.perf_counter()
        for s in subjects:
            reg.history(s, "ses-01")
        t_hist = (time.perf_counter() - t0) / len(subjects)
        rows.append(_row("registry history(subject, session)", "2 records", t_hist,
                        float("nan"), 2))
        t0 = time.perf_counter()
        reg.export_tsv(tmp / "export.tsv")
        rows.append(_row("registry export_tsv", label, time.perf_counter() - t0,
                        float("nan"), n))
        reg.close()
        size_mb = path.stat().st_size / 1e6
    for r in rows:
        r["note"] = f"file {size_mb:.1f} MB after {2 * n} records"
    return rows


if __name__ == "__main__":
    print("| operation | size | registry [ms] | sqlite3 twin [ms] | records/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in run(quick="--quick" in sys.argv):
        twin = "–" if r["numpy_ms"] != r["numpy_ms"] else f"{r['numpy_ms']:.0f}"
        print(f"| {r['kernel']} | {r['shape']} | {r['rust_ms']:.1f} | {twin} "
              f"| {r['records_per_s']:,} |")
    print(r["note"])
