"""Distributed runs on dask: the cluster (a local one sized from the machine, a running
scheduler, or SLURM/PBS jobs through dask-jobqueue) and the task loop that runs one task
per item, retries tasks whose worker died, and turns every failure into a result.

Nothing here knows what a visit is: :mod:`alsiron.runs.bidsapp` gives the task function
(one visit → one :class:`TaskResult`), its items and their labels.  The engine is
``dask.distributed``; alsiron only sizes the workers and reports.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alsiron.errors import AlsironError

log = logging.getLogger("alsiron")

#: Peak memory assumed for one visit when sizing a local cluster [bytes]: the default
#: chain on a 256 x 256 x 176, 6-echo volume peaks at 1.9 GB (bench/RESULTS.md); twice
#: that leaves room for the relaxometry fits and a T1w registration.
VISIT_MEMORY_BYTES = 4 * 2**30
#: Attempts a task gets when its worker dies under it (dask's ``allowed-failures`` counts
#: the deaths after the first one).
DEFAULT_RETRIES = 2
#: How long to wait for a scheduler given with ``--scheduler`` [s].
CONNECT_TIMEOUT_S = 10

Backend = Literal["local", "serial", "scheduler", "slurm", "pbs"]
Status = Literal["done", "skipped", "failed"]


@dataclass
class TaskResult:
    """What one task reports.

    Attributes
    ----------
    label : str
        The item's label (``sub-01_ses-01``).
    status : {"done", "skipped", "failed"}
        Computed now, already complete (resume), or failed.
    reason : str
        One line: why it failed or why it was skipped (empty when done).
    seconds : float
        Wall time of the task on its worker [s].
    worker : str
        Host and process id that ran it.
    cpu_seconds : float
        CPU time of the task's process over the task, all its threads [s] (less
        sensitive to other load on the machine than ``seconds``).
    """

    label: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    worker: str = ""
    cpu_seconds: float = 0.0


@dataclass
class BatchOptions:
    """Where and how the tasks run.

    Attributes
    ----------
    backend : {"local", "serial", "scheduler", "slurm", "pbs"}
        A ``LocalCluster`` of worker processes (default); one after the other in this
        process (no dask); a running scheduler at ``scheduler``; or SLURM/PBS jobs.
    scheduler : str or None
        ``tcp://HOST:PORT`` of a running dask scheduler (backend ``"scheduler"``).
    workers : int or None
        Worker processes (local: default from cores and memory, :func:`local_cluster_size`;
        SLURM/PBS: jobs to submit, one worker each, default 1).
    threads : int or None
        Threads of the numerical core in each worker (default: cores / workers).
    memory_per_worker : int or None
        Memory limit of each worker [bytes]; the default shares the machine's memory
        (local) or asks :data:`VISIT_MEMORY_BYTES` per job (SLURM/PBS).
    retries : int
        Extra attempts of a task whose worker died or that raised outside alsiron's own
        error handling.
    queue, account, walltime : str or None
        SLURM partition / PBS queue, account (project) and job wall time (``HH:MM:SS``).
    job_cores : int
        Cores requested per SLURM/PBS job (one single-threaded worker process per core).
    """

    backend: Backend = "local"
    scheduler: str | None = None
    workers: int | None = None
    threads: int | None = None
    memory_per_worker: int | None = None
    retries: int = DEFAULT_RETRIES
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    job_cores: int = 4

    @property
    def multi_machine(self) -> bool:
        """Whether workers may run on other machines (then the registry must be a server)."""
        return self.backend in ("scheduler", "slurm", "pbs")


@dataclass
class BatchSummary:
    """Results of a batch, in the items' order; its wall time [s], of which
    ``start_seconds`` went to starting or reaching the cluster; where it ran."""

    results: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    where: str = ""
    start_seconds: float = 0.0

    def count(self, status: Status) -> int:
        """How many tasks ended with ``status``."""
        return sum(r.status == status for r in self.results)


def machine_resources() -> tuple[int, int]:
    """Cores this process may use and the machine's total memory [bytes]."""
    import psutil

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(cores, 1), int(psutil.virtual_memory().total)


def local_cluster_size(cores: int, memory: int, *, workers: int | None = None,
                       visit_memory: int = VISIT_MEMORY_BYTES) -> tuple[int, int, int]:
    """Workers, core threads per worker and memory limit per worker [bytes] of a local
    cluster.

    One worker process per core, as many as fit :data:`VISIT_MEMORY_BYTES` each in 90 %
    of the memory: the Python parts of a visit hold one core, and the numerical core's
    own threads (rayon) are shared out, ``cores // workers`` each, so that workers do not
    oversubscribe the machine.
    """
    usable = int(memory * 0.9)
    n = workers if workers is not None else max(1, min(cores, usable // visit_memory))
    return n, max(1, cores // n), max(usable // n, 1)


def refuse_shared_sqlite(options: BatchOptions, registry: str | Path) -> None:
    """Refuse an SQLite registry that several machines, or a network file system, would
    share: SQLite's locks are not reliable there and records would be lost.

    Raises
    ------
    AlsironError
        Naming the registry and what to use instead.
    """
    text = os.fspath(registry)
    if "://" in text and not text.startswith("sqlite:"):
        return
    path = Path(text.removeprefix("sqlite:///")) if text.startswith("sqlite:") else Path(text)
    if options.multi_machine:
        raise AlsironError(
            f"{path}: an SQLite registry cannot be shared by workers on several machines "
            "(file locks on a network file system lose records); pass --registry "
            "postgresql://USER@HOST/DB")
    fs = filesystem_type(path)
    if fs in _NETWORK_FS:
        raise AlsironError(
            f"{path}: the SQLite registry lies on a network file system ({fs}), where its "
            "locks are not reliable; put it on a local disk or pass --registry "
            "postgresql://USER@HOST/DB")


_NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs",
                         "beegfs", "fuse.sshfs", "ceph", "glusterfs", "9p"})


def filesystem_type(path: Path) -> str:
    """File-system type (``ext4``, ``nfs4``, ...) of the mount holding ``path`` (or its
    nearest existing parent); empty when unknown."""
    import psutil

    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if target.is_relative_to(mount) and len(mount) > len(best):
            best, fstype = mount, part.fstype
    return fstype


def _import_jobqueue() -> Any:
    """``dask_jobqueue``, imported without letting it keep the SIGINT handler it installs
    at import (``sys.exit`` on Ctrl-C), which would turn an interrupt into a plain exit
    and bypass alsiron's interrupt path (no partial outputs, exit status 130)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        import dask_jobqueue

        return dask_jobqueue
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    finally:
        signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def make_jobqueue_cluster(options: BatchOptions, **extra: Any) -> Any:
    """A dask-jobqueue ``SLURMCluster`` or ``PBSCluster`` from ``options`` (not scaled:
    :func:`run_tasks` asks for ``options.workers`` jobs).

    Each job asks for ``job_cores`` cores and runs that many single-threaded worker
    processes, each with ``memory_per_worker`` (default :data:`VISIT_MEMORY_BYTES`).
    """
    if options.backend not in ("slurm", "pbs"):
        raise ValueError(f"not a job-queue backend: {options.backend}")
    jobqueue = _import_jobqueue()
    Cluster = jobqueue.SLURMCluster if options.backend == "slurm" else jobqueue.PBSCluster
    memory = options.memory_per_worker or VISIT_MEMORY_BYTES
    kwargs: dict[str, Any] = {
        # One single-threaded worker process per core, one visit each at a time: the
        # Python parts of a visit are serial, so processes use the cores best
        # (bench/RESULTS.md), and memory is asked per process.
        "cores": options.job_cores, "processes": options.job_cores,
        "memory": f"{options.job_cores * memory // 2**20}MiB",
        "walltime": options.walltime or "04:00:00",
        "job_script_prologue": ["export ALSIRON_NUM_THREADS=1"],
    }
    if options.queue:
        kwargs["queue"] = options.queue
    if options.account:
        kwargs["account"] = options.account
    kwargs.update(extra)
    return Cluster(**kwargs)


def _connect(options: BatchOptions) -> tuple[Any, Any, str]:
    """Client, the cluster this run made (None for ``--scheduler``) and where it runs."""
    import dask
    from distributed import Client, LocalCluster

    if options.backend == "scheduler":
        address = options.scheduler or ""
        try:
            client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AlsironError(f"cannot reach the dask scheduler at {address}: {first}") from None
        return client, None, f"scheduler {address}"
    if options.backend in ("slurm", "pbs"):
        cluster = make_jobqueue_cluster(options)
        cluster.scale(jobs=options.workers or 1)
        return Client(cluster), cluster, (f"{options.backend.upper()} jobs: {options.workers or 1}"
                                          f" x {options.job_cores} workers")
    cores, memory = machine_resources()
    n, threads, mem = local_cluster_size(cores, memory, workers=options.workers)
    if options.memory_per_worker:
        mem = options.memory_per_worker
    # A worker killed under a task counts against it; after this many deaths the task is
    # failed (KilledWorker) instead of taking down worker after worker.
    with dask.config.set({"distributed.scheduler.allowed-failures": options.retries}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               memory_limit=mem, host="127.0.0.1", dashboard_address=None)
    options.threads = options.threads or threads
    return Client(cluster), cluster, (f"local cluster: {n} worker processes x "
                                      f"{options.threads} core threads, "
                                      f"{mem / 2**30:.1f} GiB each")


def _failure_line(exc: BaseException) -> str:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return "its worker died while running it, on every attempt (out of memory? killed?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_tasks(func: Callable[..., TaskResult], items: Sequence[Any], labels: Sequence[str],
              options: BatchOptions, *, args: tuple[Any, ...] = (),
              progress: Callable[[TaskResult, int, int], None] | None = None,
              on_client: Callable[[Any], None] | None = None) -> BatchSummary:
    """Run ``func(item, *args, threads=...)`` for every item, one task each.

    Parameters
    ----------
    func : callable
        Importable on the workers (a module-level function); returns a
        :class:`TaskResult` and catches its own expected failures.
    items, labels : sequences
        The tasks' inputs and their labels (same length).
    options : BatchOptions
    args : tuple
        Further positional arguments of ``func`` (sent to every task).
    progress : callable, optional
        ``progress(result, n_finished, n_total)`` as each task finishes.
    on_client : callable, optional
        Receives the dask client once it is connected (tests, monitoring).

    Returns
    -------
    BatchSummary
        A task that raised, or whose worker died on every attempt, is a ``failed`` result
        with a one-line reason; the others go on.

    Raises
    ------
    AlsironError
        The scheduler cannot be reached.
    """
    t0 = time.perf_counter()
    total = len(items)
    results: dict[int, TaskResult] = {}

    def finished(i: int, res: TaskResult) -> None:
        results[i] = res
        if progress is not None:
            progress(res, len(results), total)

    if options.backend == "serial":
        for i, item in enumerate(items):
            try:
                res = func(item, *args, threads=options.threads)
            except Exception as exc:  # a bug in one item must not stop the others
                log.exception("%s failed", labels[i])
                res = TaskResult(labels[i], "failed", _failure_line(exc))
            finished(i, res)
        return BatchSummary([results[i] for i in range(total)],
                            time.perf_counter() - t0, "this process, one after the other")

    from distributed import as_completed

    client, cluster, where = _connect(options)
    started = time.perf_counter() - t0
    try:
        if on_client is not None:
            on_client(client)
        run_id = uuid.uuid4().hex[:8]
        futures = {}
        for i, item in enumerate(items):
            fut = client.submit(func, item, *args, threads=options.threads,
                                key=f"{labels[i]}-{run_id}", pure=False,
                                retries=options.retries)
            futures[fut] = i
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:
                res = TaskResult(labels[i], "failed", _failure_line(exc))
            finished(i, res)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return BatchSummary([results[i] for i in range(total)], time.perf_counter() - t0, where,
                        started)


def noop_task(item: Any, *, threads: int | None = None) -> TaskResult:
    """A task that does nothing: the scheduler's own cost per task (bench/bench_batch.py)."""
    return TaskResult(str(item), "done")
