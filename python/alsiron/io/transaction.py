"""A visit's outputs as one transaction: staged beside their folder, then published and
recorded together, so an interrupt at any point leaves the old complete set or the new
complete set of a visit, never a mix.

Life of a :class:`VisitTransaction` (used by the ``qsm``, ``relax`` and ``roi`` runs):

1. :meth:`VisitTransaction.begin`, before any computing: dead staging folders of earlier
   runs in the destination folder are resolved (:func:`recover`), the output set is
   checked free (or ``overwrite``), the disk is checked for room, and a staging folder
   ``<anat>/.alsiron-staging_<entities>_<id>/`` is created and locked (``flock``) for the
   life of the run.
2. The run writes every output through :attr:`VisitTransaction.staged`, an
   :class:`~alsiron.io.derivatives.OutputPlan` whose files lie in the staging folder.
3. :meth:`VisitTransaction.commit`, under a lock on the destination folder: a manifest
   (old files, new files, registry key) is written; the old set's files (every file the
   command can produce for the visit, :attr:`replaces`) move into ``.previous/`` inside
   the staging folder, the new files move into place, the registry record (carrying the
   transaction id and the outputs' SHA-256) is stored, a ``.committed`` marker is
   written and the staging folder is removed.

The commit point is the registry write (without a registry: the marker).  A failure or
an interrupt before it moves the new files back and the old ones into place; after it
the old files are dropped.  A run killed outright (SIGKILL, power loss) leaves its
staging folder; the next run that publishes into that folder decides from the marker or
the registry (is a record with this transaction id stored?) and rolls the set back or
forward.  Writers of one visit serialise on the folder lock, so two ``--overwrite`` runs
of a visit publish one after the other and the last one's files and record stay
together.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alsiron.errors import AlsironError, OutputExistsError, OutputWriteError
from alsiron.io.atomic import remove_stale_temporaries, save_json, sha256_file, write_error
from alsiron.io.derivatives import OutputPlan

try:  # POSIX; elsewhere runs of one visit are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("alsiron")

#: Name prefix of a staging folder (hidden, so BIDS tools ignore it).
STAGING_PREFIX = ".alsiron-staging_"
_MANIFEST = ".publish.json"
_COMMITTED = ".committed"
_PREVIOUS = ".previous"
#: Test-only: ``STAGE:SIGNAL`` (e.g. ``inversion:SIGKILL``) makes the run send itself
#: SIGNAL when it reaches STAGE (:func:`interrupt_point`), so tests hit stages exactly.
INTERRUPT_ENV = "ALSIRON_TEST_INTERRUPT"
#: Room [bytes] planned for each non-image output (sidecar, table, QC image).
SMALL_FILE_BYTES = 1 << 20


def interrupt_point(stage: str) -> None:
    """Send this process the signal named in ``$ALSIRON_TEST_INTERRUPT`` when its stage
    is ``stage`` (tests only; a no-op when the variable is unset).

    SIGINT and SIGTERM are handled by Python at once, so the interrupt lands exactly
    here; SIGKILL ends the process here.
    """
    spec = os.environ.get(INTERRUPT_ENV)
    if not spec:
        return
    where, _, name = spec.rpartition(":")
    if where == stage:
        os.kill(os.getpid(), getattr(signal, name))


# ---------------------------------------------------------------------- checks


def free_bytes(folder: Path) -> int:
    """Free space [bytes] on the file system of ``folder`` (or its nearest existing
    parent) for an unprivileged writer."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def planned_bytes(plan: OutputPlan, voxels: int) -> int:
    """Upper estimate [bytes] of a plan's outputs: every image as uncompressed float32 of
    ``voxels`` voxels, every other file :data:`SMALL_FILE_BYTES`."""
    total = 0
    for path in plan.paths():
        total += 4 * voxels if path.name.endswith((".nii.gz", ".nii")) else SMALL_FILE_BYTES
    return total


def check_disk_space(plan: OutputPlan, voxels: int) -> None:
    """Refuse a run whose outputs may not fit on the disk (before any computing).

    Raises
    ------
    OutputWriteError
        One line naming the folder, the space needed and the space free.
    """
    folder = plan_folder(plan)
    need, free = planned_bytes(plan, voxels), free_bytes(folder)
    if free < need:
        raise OutputWriteError(folder, f"not enough free disk space for this visit's outputs "
                                       f"(needs up to {need / 2**20:.0f} MiB, "
                                       f"{free / 2**20:.0f} MiB free)", errno.ENOSPC)


def check_set_free(plan: OutputPlan, replaces: list[Path], overwrite: bool) -> None:
    """Refuse when any file of the visit's output set exists and ``overwrite`` is off.

    Raises
    ------
    OutputExistsError
        Naming the first existing file (files of ``plan`` first, then the rest of the
        set, so that stale files of an old set are never silently replaced).
    """
    if overwrite:
        return
    existing = [p for p in dict.fromkeys([*plan.paths(), *replaces]) if p.exists()]
    if not existing:
        return
    raise OutputExistsError(f"{existing[0]}: already exists (use --overwrite to replace "
                            "the outputs)")


def plan_folder(plan: OutputPlan) -> Path:
    """The one folder every file of a visit's plan lies in."""
    folders = {p.parent for p in plan.paths()}
    if len(folders) != 1:
        raise ValueError(f"a visit's outputs must share one folder, got {sorted(folders)}")
    return folders.pop()


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are empty; others stay."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


# ---------------------------------------------------------------------- locks


@contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on a folder; yields False (without waiting) when
    ``blocking`` is off and another process holds it.  The kernel releases the lock when
    its holder dies, even by SIGKILL."""
    if fcntl is None:
        yield True
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- registry hook


@dataclass
class RegistryHook:
    """How a transaction records its visit: ``record(outputs)`` stores the record (with
    ``outputs`` = transaction id and output checksums) in the registry whose display name
    is ``name``; ``recorded(key, txn)`` says whether a record of that transaction is
    stored (current or superseded) for ``key`` = (subject, session, run)."""

    name: str
    key: tuple[str, str, int]
    record: Callable[[dict[str, Any]], None]
    recorded: Callable[[tuple[str, str, int], str], bool]


# ---------------------------------------------------------------------- recovery


def _read_manifest(staging: Path) -> dict[str, Any] | None:
    try:
        return json.loads((staging / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _undo(staging: Path, manifest: dict[str, Any]) -> None:
    """Put the old set back: new files that reached the folder go back into staging, old
    files come back from ``.previous/``.  Idempotent (a second call after an interrupt
    finishes the job)."""
    folder = Path(manifest["folder"])
    for name in manifest["new"]:
        # Old files leave before any new file arrives, so a new name missing from staging
        # but present in the folder is the new file.
        if not (staging / name).exists() and (folder / name).exists():
            os.replace(folder / name, staging / name)
    previous = staging / _PREVIOUS
    for name in manifest["old"]:
        if (previous / name).exists():
            os.replace(previous / name, folder / name)


def _decide(staging: Path, manifest: dict[str, Any], registry: RegistryHook | None) -> bool:
    """True when the transaction of ``staging`` committed (its marker, or a stored record
    with its id).

    Raises
    ------
    AlsironError
        The decision needs a registry this run does not use.
    """
    if (staging / _COMMITTED).exists():
        return True
    if manifest.get("registry") is None:
        return False
    if registry is None or registry.name != manifest["registry"]:
        raise AlsironError(
            f"{staging}: an interrupted run was publishing these outputs with the registry "
            f"{manifest['registry']}; run again with that registry so it can be finished or "
            "rolled back")
    subject, session, run = manifest["key"]
    return registry.recorded((subject, session, int(run)), manifest["id"])


def recover(folder: Path, registry: RegistryHook | None = None) -> list[str]:
    """Resolve the staging folders that dead runs left in ``folder``.

    A staging folder whose run is alive (its lock is held) is left alone.  One without a
    manifest never started publishing: it is removed.  One with a manifest is rolled
    forward when its transaction committed (marker or registry record) and back
    otherwise; then removed.  Returns one line per folder resolved, also logged as a
    warning.

    Raises
    ------
    AlsironError
        A staging folder's decision needs a registry this run does not use.
    """
    done: list[str] = []
    try:
        candidates = sorted(p for p in Path(folder).iterdir()
                            if p.name.startswith(STAGING_PREFIX) and p.is_dir()
                            and not p.is_symlink())
    except OSError:
        return done
    for staging in candidates:
        with _flock(staging, blocking=False) as free:
            if not free:
                continue
            manifest = _read_manifest(staging)
            if manifest is None:
                what = "removed the unfinished outputs of an interrupted run"
            elif _decide(staging, manifest, registry):
                what = "finished publishing an interrupted run's outputs"
            else:
                _undo(staging, manifest)
                what = "rolled back an interrupted run's partly published outputs"
            shutil.rmtree(staging, ignore_errors=True)
        line = f"{staging}: {what}"
        log.warning("%s", line)
        done.append(line)
    return done


# ---------------------------------------------------------------------- transaction


@dataclass
class VisitTransaction:
    """One visit's output set on its way to the derivatives (see the module docstring).

    Attributes
    ----------
    plan : OutputPlan
        The files the run writes, at their final paths.
    staged : OutputPlan
        The same files in the staging folder: what the writers write to.
    replaces : list of Path
        Every file the command can produce for the visit (the old set): those the new set
        does not produce are removed when it is published.
    overwrite : bool
    staging : Path
    id : str
        Transaction id (stored in the registry record).
    """

    plan: OutputPlan
    staged: OutputPlan
    replaces: list[Path]
    overwrite: bool
    staging: Path
    id: str
    _lock_fd: int | None = field(default=None, repr=False)
    _open: bool = field(default=True, repr=False)
    _created: list[Path] = field(default_factory=list, repr=False)

    @classmethod
    def begin(cls, plan: OutputPlan, *, replaces: OutputPlan | None = None,
              overwrite: bool = False, voxels: int | None = None,
              registry: RegistryHook | None = None) -> VisitTransaction:
        """Check a visit's output set and open its staging folder, before any computing.

        Parameters
        ----------
        plan : OutputPlan
            The files this run writes.
        replaces : OutputPlan, optional
            Every file the command can write for the visit (default: ``plan``).
        overwrite : bool
            Replace an existing set instead of refusing.
        voxels : int, optional
            Voxels per image, for the free-disk check (skipped when None).
        registry : RegistryHook, optional
            For resolving staging folders of killed runs that used a registry.

        Raises
        ------
        OutputExistsError, OutputWriteError, AlsironError
            The set exists without ``overwrite``, the disk has no room, the folder
            cannot be written, or a killed run's staging folder needs another registry.
        """
        folder = plan_folder(plan)
        olds = list(dict.fromkeys((replaces or plan).paths()))
        # Folders made here go again if the run ends without publishing.
        created = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(folder, exc) from None
        stem = "_".join(f"{k}-{v}" for k, v in plan.entities.items())
        txn = uuid.uuid4().hex
        staging = folder / f"{STAGING_PREFIX}{stem}_{txn[:12]}"
        try:
            if voxels is not None:
                check_disk_space(plan, voxels)
            # Under the folder lock, so that no other run's recovery sees this staging
            # folder before it is locked.
            with _flock(folder):
                recover(folder, registry)
                for path in olds:  # temporaries of a killed run of the older design
                    remove_stale_temporaries(path)
                check_set_free(plan, olds, overwrite)
                try:
                    staging.mkdir()
                    fd = os.open(staging, os.O_RDONLY)
                except OSError as exc:
                    raise write_error(staging, exc) from None
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            _remove_empty(created)
            raise
        return cls(plan=plan, staged=plan.relocated(staging), replaces=olds,
                   overwrite=overwrite, staging=staging, id=txn, _lock_fd=fd,
                   _created=created)

    def final_path(self, path: str | os.PathLike[str]) -> Path:
        """The published path of a file written into the staging folder (other paths are
        returned unchanged)."""
        p = Path(path)
        return self.plan_folder / p.name if p.parent == self.staging else p

    def final_paths(self, paths: list[Path]) -> list[Path]:
        """:meth:`final_path` of each path."""
        return [self.final_path(p) for p in paths]

    @property
    def plan_folder(self) -> Path:
        """The destination folder."""
        return plan_folder(self.plan)

    def output_checksums(self) -> dict[str, str]:
        """SHA-256 of every staged output, keyed by file name."""
        return {p.name: sha256_file(p) for p in sorted(self.staging.iterdir())
                if p.is_file() and not p.name.startswith(".")}

    def commit(self, registry: RegistryHook | None = None) -> None:
        """Publish the staged set and record it, as one step (see the module docstring).

        Raises
        ------
        OutputExistsError
            Without ``overwrite``, another run published the visit meanwhile.
        OutputWriteError, RegistryError
            The files could not be moved or the record not stored: the old set is back
            in place and the registry unchanged.
        """
        folder = self.plan_folder
        new = sorted(p.name for p in self.staging.iterdir()
                     if p.is_file() and not p.name.startswith("."))
        outputs = {"transaction": self.id, "files": self.output_checksums()}
        with _flock(folder):
            # A run killed while publishing here must be resolved before this set moves
            # in, or its later rollback would move this set's files.
            recover(folder, registry)
            check_set_free(self.plan, self.replaces, self.overwrite)
            old = sorted({p.name for p in self.replaces if p.exists()}
                         | {n for n in new if (folder / n).exists()})
            manifest = {"id": self.id, "folder": str(folder), "old": old, "new": new,
                        "registry": None if registry is None else registry.name,
                        "key": None if registry is None else list(registry.key)}
            try:
                save_json(self.staging / _MANIFEST, manifest)
                self._publish(folder, manifest)
                interrupt_point("registry")
                if registry is not None:
                    registry.record(outputs)
                interrupt_point("committed")
                (self.staging / _COMMITTED).touch()
            except BaseException:
                self._fail(manifest, registry)
                raise
            self._close()

    def _publish(self, folder: Path, manifest: dict[str, Any]) -> None:
        previous = self.staging / _PREVIOUS
        try:
            previous.mkdir(exist_ok=True)
            for name in manifest["old"]:
                os.replace(folder / name, previous / name)
            for i, name in enumerate(manifest["new"]):
                if i == len(manifest["new"]) // 2:
                    interrupt_point("publish")
                os.replace(self.staging / name, folder / name)
        except OSError as exc:
            raise write_error(folder, exc) from None

    def _fail(self, manifest: dict[str, Any], registry: RegistryHook | None) -> None:
        """After an error or interrupt while publishing: roll forward if the record was
        stored after all, else back; a staging folder that cannot be decided stays for the
        next run (:func:`recover`)."""
        try:
            committed = _decide(self.staging, manifest, registry)
        except Exception:  # the registry cannot tell now: the next run decides
            log.warning("%s: could not tell whether the record was stored; the next run "
                        "into this folder finishes or rolls back these outputs", self.staging)
            self._release()
            return
        if not committed:
            _undo(self.staging, manifest)
        self._close()
        if not committed:
            _remove_empty(self._created)

    def abort(self) -> None:
        """Drop the staged files (the destination is untouched, and folders that
        :meth:`begin` made go again when empty); idempotent."""
        if self._open:
            self._close()
            _remove_empty(self._created)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._open = False

    def _close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._release()

    def __enter__(self) -> VisitTransaction:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving without commit (an error or interrupt while computing or staging).
        self.abort()
