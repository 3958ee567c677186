"""Atomic writing of NIfTI images, JSON sidecars and tables.

Every output goes to a temporary file in the destination folder and is renamed into
place, so an interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from alsiron.errors import OutputExistsError, OutputWriteError

#: About when this process started (this module is imported before any output is written).
_PROCESS_START = time.time()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception the temporary file is removed and ``final`` is left untouched.
    Raises :class:`OutputExistsError` when ``final`` exists and ``overwrite`` is false,
    and :class:`OutputWriteError` naming ``final`` when the system refuses the write (disk
    full, read-only file system, no permission).  The temporary name keeps the final
    suffixes so writers that infer the format from the extension (``.nii.gz``) behave as
    for the final file.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final}: already exists (use --overwrite to replace it)")
    suffix = "".join(final.suffixes)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}",
                                        dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(final, exc) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; a finished output gets the mode any new file would get.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(final, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary_pattern(final: Path) -> re.Pattern[str]:
    # Exactly the names ``mkstemp(prefix=".NAME.", suffix=".partSUFFIX")`` creates above.
    suffix = "".join(final.suffixes)
    return re.compile(re.escape(f".{final.name}.") + r"[a-z0-9_]{8}"
                      + re.escape(f".part{suffix}"))


def remove_stale_temporaries(final: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files of ``final`` left by a killed alsiron (SIGKILL, power loss).

    Only files beside ``final`` whose name is exactly the temporary-name pattern of
    :func:`atomic_path` for ``final`` and that were last modified before this process
    started are removed; returns the removed paths.
    """
    final = Path(final)
    pattern = _temporary_pattern(final)
    removed: list[Path] = []
    try:
        candidates = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() \
                    and path.stat().st_mtime < _PROCESS_START:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def write_error(path: str | os.PathLike[str], exc: OSError) -> OutputWriteError:
    """The one-line error for a failed write of ``path`` (disk full, read-only, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputWriteError(path, f"cannot write ({reason})", exc.errno)


def _write_atomic(final: Path, writer: Callable[[Path], None], overwrite: bool) -> Path:
    with atomic_path(final, overwrite=overwrite) as tmp:
        writer(tmp)
    return final


def save_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically; returns the final path."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")

    return _write_atomic(Path(path), write, overwrite)


def save_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write a text file (e.g. a TSV table) atomically; returns the final path."""
    return _write_atomic(Path(path), lambda tmp: tmp.write_text(text), overwrite)


def save_nifti(
    path: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray,
    *,
    sidecar: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a NIfTI-1 image (and its JSON sidecar) atomically.

    Parameters
    ----------
    path : path ending in ``.nii`` or ``.nii.gz``
        Final image path; the sidecar goes beside it with the ``.json`` extension.
    data : ndarray
        Image data; booleans are stored as uint8, floats as float32.
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform, written to both qform and sform.
    sidecar : dict, optional
        JSON sidecar content.
    overwrite : bool
        Replace existing outputs instead of refusing.
    """
    path = Path(path)
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if sidecar is not None:
        # Refuse before writing anything so the pair stays consistent.
        side = sidecar_path(path)
        if side.exists() and not overwrite:
            raise OutputExistsError(f"{side}: already exists (use --overwrite to replace it)")
    _write_atomic(path, lambda tmp: nib.save(img, tmp), overwrite)
    if sidecar is not None:
        save_json(sidecar_path(path), sidecar, overwrite=True)
    return path


def sidecar_path(image_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar path of a NIfTI image path."""
    p = Path(image_path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
