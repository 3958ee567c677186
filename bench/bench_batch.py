"""Participant-level throughput: visits per hour with the local dask cluster against the
same visits run one by one in one process, and the scheduler's own cost per task.

Usage: ``python bench/bench_batch.py [--quick] [--visits N] [--matrix M] [--voxel-size MM]``

Each configuration processes the same phantom visits (QSM + motor-cortex indices +
registry, relaxometry off: the phantom has no MESE) into its own fresh output folder:

* ``serial``: :func:`alsiron.runs.bidsapp.run_participant_level` with ``--serial`` (one
  visit after the other, the numerical core on every core);
* ``dask 2x1``: a local cluster of 2 single-threaded worker processes (the default on 2
  cores);
* ``dask 1x2``: 1 worker process, the numerical core with 2 threads (what threads inside
  one process give).

Wall times include the cluster's start (given apart); visits per hour are counted from
the first task's submission (the workers' first visit still pays their imports).  Then a
rerun of ``dask 2x1`` (every visit skipped: the cost of the resume check) and 2000 no-op
tasks through
:func:`alsiron.runs.batch.run_tasks` on a 2-worker cluster (overhead per task).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from alsiron.runs.batch import BatchOptions, noop_task, run_tasks
from alsiron.runs.bidsapp import ParticipantOptions, run_participant_level
from alsiron.sim.phantom import write_dataset


def _visits_per_hour(n: int, seconds: float) -> float:
    return 3600.0 * n / seconds


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32^3 phantoms, 6 visits")
    ap.add_argument("--visits", type=int, default=None, help="visits (even; default 8)")
    ap.add_argument("--matrix", type=int, default=None, help="phantom matrix (default 96)")
    ap.add_argument("--voxel-size", type=float, default=None, help="mm (default 2)")
    args = ap.parse_args()
    visits = args.visits or (6 if args.quick else 8)
    matrix = args.matrix or (32 if args.quick else 96)
    voxel = args.voxel_size or (6.0 if args.quick else 2.0)
    opts = ParticipantOptions(relax=None)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp) / "bids", subjects=visits // 2, sessions=2,
                             matrix=matrix, voxel_size=voxel, seed=0)
        rows = []
        configs = [("serial (one by one, 2 core threads)", BatchOptions(backend="serial")),
                   ("dask local 2 workers x 1 thread", BatchOptions(workers=2, threads=1)),
                   ("dask local 1 worker x 2 threads", BatchOptions(workers=1, threads=2))]
        for i, (name, batch) in enumerate(configs):
            out = Path(tmp) / f"out{i}"
            summary = run_participant_level(root, out, opts, batch)
            assert summary.count("done") == visits, summary.results
            per_visit = sum(r.seconds for r in summary.results) / visits
            cpu = sum(r.cpu_seconds for r in summary.results) / visits
            steady = summary.seconds - summary.start_seconds
            rows.append((name, summary.seconds, summary.start_seconds,
                         _visits_per_hour(visits, steady), per_visit, cpu))
        t0 = time.perf_counter()
        again = run_participant_level(root, Path(tmp) / "out1", opts,
                                      BatchOptions(workers=2, threads=1))
        resume_s = time.perf_counter() - t0
        assert again.count("skipped") == visits
        n_noop = 2000
        noop = run_tasks(noop_task, list(range(n_noop)), [f"noop{i}" for i in range(n_noop)],
                         BatchOptions(workers=2, threads=1))
        t_cluster = time.perf_counter()
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            start = time.perf_counter() - t_cluster
            t0 = time.perf_counter()
            futures = client.map(noop_task, range(n_noop), pure=False)
            client.gather(futures)
            noop_gathered = time.perf_counter() - t0

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}; {visits} visits of {matrix}^3 x "
          f"{voxel:g} mm")
    print("| configuration | wall [s] | of which cluster start [s] | visits/hour after start "
          "| mean visit in its worker [s] | mean CPU per visit [s] |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, start_s, vph, per_visit, cpu in rows:
        print(f"| {name} | {wall:.1f} | {start_s:.1f} | {vph:.0f} | {per_visit:.2f} "
              f"| {cpu:.2f} |")
    print(f"\nrerun, every visit skipped (resume check, 2 workers): {resume_s:.1f} s "
          f"({1000 * again.seconds / visits:.0f} ms per visit inside the run)")
    print(f"no-op tasks: {n_noop} through run_tasks in {noop.seconds:.1f} s incl. cluster "
          f"start; bare client.map + gather {1000 * noop_gathered / n_noop:.2f} ms per task "
          f"(cluster start {start:.1f} s)")


if __name__ == "__main__":
    main()
