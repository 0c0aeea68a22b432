"""File I/O of the sync: new files written whole, local files copied inside the kernel,
zips unpacked through staged parts, and files replaced only when whole (a temporary name
beside them, then a rename).

Nothing here knows about sources or the manifest: the engine stages into the dropoff's
``.clpipe-sync/tmp`` (same filesystem, so each rename is atomic) and renames into place.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import struct
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..errors import PermanentError, VerifyError
from ..layout import flatten_members, inside

CHUNK = 1 << 20  # bytes read or written at once where Python moves the bytes

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_MAX_COUNT = 1 << 30  # bytes asked of one copy_file_range / sendfile call
# copy_file_range fails this way where it cannot work (another filesystem on an older
# kernel, a filesystem without it, seccomp filters): sendfile is tried, then read/write
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.ETXTBSY, errno.EPERM}
)
_NO_COPY_RANGE: set[int] = set()  # st_dev of source filesystems where copy_file_range failed so
# what zipfile raises for damaged bytes, in the header as in the data (a flipped version
# field: NotImplementedError "zip file version ..."; a flipped offset: ValueError "negative
# seek value"; a flipped flag: RuntimeError "... is encrypted")
_ZIP_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, struct.error, ValueError, RuntimeError)


def write_new(path: str, data: bytes) -> int:
    """Write ``data`` to a file that must not exist yet; returns its size."""
    fd = os.open(path, _CREATE, 0o666)
    try:
        return write_all(fd, data)
    finally:
        os.close(fd)


def copy_file(src: Path | str, dst: str) -> int:
    """Copy the local file ``src`` to a file ``dst`` that must not exist yet, inside the
    kernel (``copy_file_range``, as ``cp`` does; else ``sendfile``; else read/write): the
    bytes never pass through Python. Returns the bytes copied. An ``OSError`` of the
    copy names ``src`` and ``dst``, as ``shutil.copyfile``'s does; one of opening names
    the file it could not open."""
    fd_in = os.open(src, _READ)
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(dst, _CREATE, 0o666)
        try:
            return _copy_fds(fd_in, fd_out, st.st_size, st.st_dev)
        except OSError as exc:
            exc.filename, exc.filename2 = os.fspath(src), dst
            raise
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _copy_fds(fd_in: int, fd_out: int, size: int, dev: int) -> int:
    """Copy from the current offsets to the end of ``fd_in``. Each call asks for one byte
    more than the rest of the file as ``fstat`` saw it, so a call that returns less after
    reaching that size has met the end (one call for a whole small file, as one ``read``
    would); a file that grew meanwhile is copied to its new end."""
    method = 0 if dev not in _NO_COPY_RANGE and hasattr(os, "copy_file_range") else 1
    copied = 0
    while True:
        ask = min(size - copied + 1 if copied <= size else CHUNK, _MAX_COUNT)
        try:
            if method == 0:
                n = os.copy_file_range(fd_in, fd_out, ask)
            elif method == 1:
                n = os.sendfile(fd_out, fd_in, None, ask)
            else:
                ask = min(ask, CHUNK)
                n = write_all(fd_out, os.read(fd_in, ask))
        except OSError as exc:
            if method < 2 and exc.errno in _NO_KERNEL_COPY:
                if method == 0:
                    _NO_COPY_RANGE.add(dev)
                method += 1
                continue
            raise
        if n == 0:
            if method == 0 and copied < size:  # some filesystems copy nothing this way: ask sendfile
                method = 1
                continue
            return copied
        copied += n
        if n < ask and copied >= size:
            return copied


def write_all(fd: int, data: bytes) -> int:
    """Write all of ``data`` to ``fd`` (again after a short write); returns its size."""
    done = os.write(fd, data)
    if done < len(data):  # a short write (a signal, a huge buffer): the rest
        view = memoryview(data)
        while done < len(view):
            done += os.write(fd, view[done:])
    return done


def write_whole(path: Path, fill: Callable[[TextIO], object], durable: bool = False) -> None:
    """``fill(text file)`` into a temporary file beside ``path``, renamed to ``path`` only
    when whole (on an error, a full disk included, it is removed, and ``path`` stays as it
    was). ``durable``: the file is fsynced before the rename and its folder after it."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", newline="", encoding="utf-8") as out:
            fill(out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unpack_zip(archive: Path | io.BytesIO, folder: str, dropoff: Path, tmp: Path) -> list[list]:
    """Unpack the zip ``archive`` into ``folder`` (relative to ``dropoff``), its members
    flattened to distinct portable names (:func:`~clpipe.layout.flatten_members`):
    each member is written to a part file in ``tmp`` (zipfile checks its CRC), then all
    are renamed into place; a failure removes the parts not yet placed. Returns the
    manifest's file list. Damaged bytes (a header, a CRC, an offset) raise
    :class:`~clpipe.errors.VerifyError` (retried); a member whose name would leave
    ``folder``, :class:`~clpipe.errors.PermanentError`."""
    staged: list[tuple[Path, Path, str, int]] = []
    placed = 0
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir() and i.file_size > 0]
                names = flatten_members([i.filename for i in infos])
                stem = uuid.uuid4().hex
                for n, info in enumerate(infos):
                    rel = f"{folder}/{names[info.filename]}"
                    try:
                        final = inside(dropoff, rel)
                    except ValueError as exc:  # a hostile name, not damage: not retried
                        raise PermanentError(str(exc)) from None
                    part = tmp / f"{stem}-{n}.part"
                    staged.append((part, final, rel, info.file_size))  # before it exists: a failure removes it
                    with open(part, "wb") as out:
                        if info.file_size <= CHUNK:
                            out.write(zf.read(info))  # zipfile checks the member's CRC
                        else:
                            with zf.open(info) as src:
                                shutil.copyfileobj(src, out, CHUNK)
        except _ZIP_DAMAGE as exc:  # a damaged header or body: retried like any corruption
            raise VerifyError(f"damaged zip ({str(exc) or exc.__class__.__name__})") from None
        except OSError as exc:  # a damaged offset makes a zip on disk seek before its start
            if exc.errno != errno.EINVAL:
                raise
            raise VerifyError(f"damaged zip ({exc})") from None
        for parent in {final.parent for _, final, _, _ in staged}:
            parent.mkdir(parents=True, exist_ok=True)
        for part, final, _, _ in staged:
            os.replace(part, final)
            placed += 1
        return [[rel, size, ""] for _, _, rel, size in staged]
    finally:
        for part, *_ in staged[placed:]:  # the renamed ones are in place: nothing to remove
            part.unlink(missing_ok=True)
