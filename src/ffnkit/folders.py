"""Output folders: refuse what must not be written, check room before the work, replace atomically.

Every command that writes a folder calls :func:`check_output_dir` right after parsing its options, before
it loads or changes anything, so a bad ``-o`` fails in a second instead of after an hour of work:

- a non-empty folder is refused unless ``overwrite=True`` (CLI ``--overwrite``);
- the input model's folder, and the ffnkit cache (``cache_dir()``: downloads and converted built-in
  models), are refused even with ``overwrite`` — so is any folder inside them or holding them;
- the place must be writable and (roughly) have room for the model.

A model folder is then written with :func:`atomic_folder`: everything goes into a temporary folder beside
the target (same file system), a completion marker is written last, and the folder is renamed into place.
An existing target is renamed aside first and deleted after the new one is in. A kill at any point leaves
the old complete folder or the new complete one at the target; the hidden temporaries it leaves beside the
target are finished or removed by :func:`recover` on the next save or load of that target.

Example:
    >>> check_output_dir("out/pruned", overwrite=False, model_source="smollm2-135m")
    >>> with atomic_folder(Path("out/pruned")) as tmp:
    ...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ffnkit.core.errors import OutputFolderError

__all__ = ["COMPLETE", "atomic_folder", "check_output_dir", "estimate_model_bytes", "recover"]

# Written last into a finished folder: a folder with an ffnkit manifest but without it is incomplete.
COMPLETE = ".ffnkit-complete"
_NEW = ".ffnkit-new-"  # a folder being written, beside its target: .<name>.ffnkit-new-<pid>-<hex>
_OLD = ".ffnkit-old-"  # a replaced folder waiting to be deleted: .<name>.ffnkit-old-<pid>-<hex>
# files that only a model or report folder holds: --overwrite replaces a folder only if it has one
_OUTPUT_FILES = ("config.json", "ffnkit.json", "report.json", "report.html")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 4, "BF16": 4, "F8_E4M3": 4, "F8_E5M2": 4}  # loaded as float32
_INT_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same folder, or one lies inside the other (both resolved)."""
    return a == b or a in b.parents or b in a.parents


def _cache_root() -> Path:
    from ffnkit.sources.fetch import cache_dir

    return cache_dir()


def _source_folder(model_source: str | os.PathLike | None) -> Path | None:
    """The folder a model is read from: a local folder, or a built-in model's cache folder; None for a
    hub id (its files live in the Hugging Face cache)."""
    if model_source is None:
        return None
    path = Path(model_source).expanduser()
    if path.is_dir():
        return path
    name = str(model_source)
    if "/" in name or os.sep in name or name.startswith("."):
        return None  # a hub id
    converted = _cache_root() / "models" / name  # a built-in model, converted into the cache
    return converted if converted.is_dir() else None


def _safetensors_bytes(path: Path) -> int:
    """Bytes the tensors of one safetensors file take once loaded (floating point as float32)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in info.get("shape", []):
            numel *= int(d)
        total += numel * _FLOAT_BYTES.get(info.get("dtype"), _INT_BYTES.get(info.get("dtype"), 4))
    return total


def estimate_model_bytes(model_source: str | os.PathLike | None) -> int | None:
    """Roughly the bytes a model from ``model_source`` takes when ffnkit saves it (floats as float32);
    None when it cannot be told without loading the model (a hub id, a built-in not converted yet).

    Example:
        >>> estimate_model_bytes("smollm2-135m")  # doctest: +SKIP
        538...
    """
    folder = _source_folder(model_source)
    if folder is None or not folder.is_dir():
        return None
    total = 0
    try:
        for path in folder.iterdir():
            if path.suffix == ".safetensors":
                total += _safetensors_bytes(path)
            elif path.suffix in (".bin", ".pt", ".pth"):
                total += 2 * path.stat().st_size  # half precision at worst, loaded as float32
    except (OSError, ValueError):
        return None
    return total or None


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(os.sep)


def _probe_writable(folder: Path, target: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".ffnkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write {target}: {folder} is not writable ({exc.strerror or type(exc).__name__}); "
            "choose a folder you can write to"
        ) from None


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_source: str | os.PathLike | None = None,
    needed_bytes: int | None = None,
    replace: bool = True,
) -> Path:
    """Refuse an output folder ffnkit must not write, before any long work; return it as a Path.

    Refused: a file; a non-empty folder unless ``overwrite``; the ffnkit cache or the folder of
    ``model_source`` (the input: a folder or a built-in name), or a folder inside or holding either, even
    with ``overwrite``; a place that is not writable; a disk with less free space than ``needed_bytes``
    (default: estimated from ``model_source``; 0 skips the check). ``replace=True`` (model folders):
    ``overwrite`` replaces the whole folder, so it is allowed only on a folder that holds a model or a
    report, never on the current folder or one above it. ``replace=False`` (report folders): files are
    written into it, nothing is deleted.

    Example:
        >>> check_output_dir("out/q4", overwrite=False, model_source="smollm2-135m")
        PosixPath('out/q4')
    """
    target = Path(path).expanduser()
    where = target.resolve()
    cache = _cache_root().resolve()
    if _overlaps(where, cache):
        raise OutputFolderError(
            f"{target} is {'inside' if cache in where.parents or where == cache else 'above'} the ffnkit "
            f"cache {cache}, which holds the built-in models; ffnkit never writes there: choose another folder"
        )
    source = _source_folder(model_source)
    if source is not None and _overlaps(where, source.resolve()):
        raise OutputFolderError(
            f"{target} would write over the input model {source}; ffnkit never replaces its input "
            "(not even with --overwrite): choose another folder"
        )
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"{target} exists and is not a folder; choose a folder path for the output")
    if target.is_dir():
        try:
            entries = sorted(p.name for p in target.iterdir())
        except OSError as exc:
            raise OutputFolderError(f"cannot read {target} ({exc.strerror}); choose another folder") from None
        if entries and not overwrite:
            shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
            raise OutputFolderError(
                f"{target} is not empty (it holds {shown}); choose a new or empty folder, or add "
                "--overwrite (Python: overwrite=True) to replace it"
            )
        if entries and replace:
            here = Path.cwd().resolve()
            if where == here or where in here.parents:
                raise OutputFolderError(
                    f"{target} is the current folder or holds it; --overwrite would replace it: choose "
                    "another folder"
                )
            if not any(name in entries for name in _OUTPUT_FILES):
                raise OutputFolderError(
                    f"{target} holds files but no model or report (no config.json, ffnkit.json or "
                    "report.json); --overwrite replaces only such folders: choose another folder"
                )
    # a model folder is written beside the target then renamed in; a report is written inside it
    probe = _nearest_existing(target if not replace else target.parent)
    _probe_writable(probe, target)
    needed = needed_bytes if needed_bytes is not None else estimate_model_bytes(model_source)
    if needed:
        free = shutil.disk_usage(probe).free
        if free < 1.1 * needed:
            raise OutputFolderError(
                f"{target} needs about {_mb(needed)} but only {_mb(free)} are free there; free some "
                "space or choose a folder on another disk"
            )
    return target


# -------------------------------------------------------------------------------------- atomic writes


def _beside(target: Path, tag: str) -> Path:
    name = target.name[:180]  # keep the hidden name under the file system's 255-byte limit
    return target.parent / f".{name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _leftovers(target: Path) -> list[tuple[Path, str]]:
    """Hidden temporaries of ``target`` left by processes that are no longer running: (path, tag)."""
    prefix = f".{target.name[:180]}"
    found = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        for tag in (_NEW, _OLD):
            if not p.name.startswith(prefix + tag):
                continue
            pid = p.name[len(prefix + tag) :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                found.append((p, tag))
    return found


def recover(target: str | os.PathLike) -> None:
    """Finish or undo a save of ``target`` that was killed, and delete its leftover temporaries.

    If the target is missing (killed between renaming the old folder aside and the new one in), the new
    folder is put in place when it is complete, else the old one is put back. Errors are ignored: a
    read-only place simply keeps its leftovers.

    Example:
        >>> recover("out/q4")  # before reading or writing out/q4
    """
    target = Path(target).expanduser()
    leftovers = _leftovers(target)
    if not leftovers:
        return
    with contextlib.suppress(OSError):
        if not os.path.lexists(target):
            new = [p for p, tag in leftovers if tag == _NEW and (p / COMPLETE).is_file()]
            old = [p for p, tag in leftovers if tag == _OLD]
            pick = max(new or old, key=lambda p: p.stat().st_mtime, default=None)
            if pick is not None:
                os.rename(pick, target)
                leftovers = [(p, t) for p, t in leftovers if p != pick]
        for p, _ in leftovers:
            shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished ``tmp`` at ``target``: rename the old folder aside, the new one in, delete the old."""
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()  # an empty folder holds nothing to keep
    if os.path.lexists(target):
        old = _beside(target, _OLD)
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync(target.parent)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends, mark it complete and put it
    at ``target`` (replacing what was there); if the block fails, delete it and leave ``target`` as it was.

    A full disk raises :class:`OutputFolderError` (one line) and leaves no half folder.

    Example:
        >>> with atomic_folder("out/pruned") as tmp:
        ...     model.save_pretrained(tmp)
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _beside(target, _NEW)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):  # the data reaches the disk before the rename makes it visible
            if p.is_file():
                _fsync(p)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        _swap_in(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputFolderError(
                f"the disk is full while writing {target}; nothing was written there: free some space "
                "or choose a folder on another disk"
            ) from None
        raise OutputFolderError(
            f"could not write {target} ({exc.strerror or exc}); nothing was written there: check the folder"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
