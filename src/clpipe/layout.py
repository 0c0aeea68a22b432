"""Where files land: portable names, BIDS-safe labels, layout templates, zip members, and
one local path per remote file.

Every name the tool builds from remote text (labels, file names, zip member names, DICOM
attributes) goes through :func:`portable_name`: ASCII (transliterated, ``é`` -> ``e``,
``ß`` -> ``ss``), no spaces, none of ``/ \\ : * ? " < > |``, no control characters, not
starting with ``.`` or ``-``, at most 255 bytes. So a name can never write outside the
dropoff, and works on every filesystem data is copied to (SMB/NTFS shares included) and in
shell loops on the cluster.

Different remote items can still come out with one name (``José`` in NFC and in NFD, ``x``
and `` x ``, names that differ only after 255 bytes). :class:`NameResolver` gives each its
own: it sees all the items of a listing first, so which one keeps the plain name does not
depend on the listing's order (one whose name needed no change, else the smallest
identity), and every other one gets a short suffix made from its identity, ``name~3fa2c1.dcm``.
:class:`Claims` is the engine's last guard: no two entries of one run get one path, and no
entry's file is another's folder.

:data:`STATE_DIR` is the folder in a dropoff where the sync keeps its state: a name of the
dropoff's layout, here so that a source (a ``file://`` folder that holds a dropoff) can
skip it without importing the sync engine.

This module sits below both the sources and the sync engine (it imports neither).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import string
import unicodedata
from array import array
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath

STATE_DIR = ".clpipe-sync"  # in every dropoff: the manifest, journal, lock and staging area

FIELDS = ("group", "project", "subject", "session", "acquisition", "filename")
_BIDS_PREFIX = {"subject": "sub-", "session": "ses-"}
BIDS_FIELDS = ("subject", "session")

NAME_MAX = 255  # bytes in one path component: ext4, XFS, GPFS, Lustre, NTFS (as UTF-16 units)
SUFFIX_SEP = "~"  # name~3fa2c1.dcm
SUFFIX_HEX = 6  # hex digits of the suffix (longer only if two suffixes meet)
_LENGTHS = (SUFFIX_HEX, 10, 16, 40)
_MASK = (1 << 64) - 1  # a name's hash() as an unsigned 64-bit number

_BAD = '\\s\\x00-\\x1f\\x7f/\\\\:*?"<>|'  # whitespace, control characters, / \ : * ? " < > |
_BAD_RUN = re.compile(f"[{_BAD}]+")
_STRIP = "".join(map(chr, range(33))) + '\x7f/\\:*?"<>|'
_PORTABLE = re.compile(f"[^{_BAD}.\\-][^{_BAD}]*")
# names Windows (and so an SMB share) reserves, with any extension
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", re.IGNORECASE)
# many names, each ended by "\n", each one is_portable would take (all_portable)
_ALL_PORTABLE = re.compile(
    f"(?:(?!(?:CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(?:\\.[^\\n]*)?\\n)[^{_BAD}.\\-][^{_BAD}]{{0,{NAME_MAX - 1}}}(?<!\\.)\\n)*",
    re.IGNORECASE,
)
# a file's extension, kept when a name is cut or suffixed: .dcm, .nii.gz, .dicom.zip
_EXT = re.compile(r"(\.(nii|tar|dicom|dcm))?\.[A-Za-z0-9]{1,8}$", re.IGNORECASE)


def is_portable(text: str) -> bool:
    return (
        len(text) <= NAME_MAX
        and text.isascii()
        and _PORTABLE.fullmatch(text) is not None
        and not text.endswith(".")
        and _RESERVED.fullmatch(text) is None
    )


def all_portable(names: Sequence[str]) -> bool:
    """Is every name :func:`is_portable`? (One match over all of them: a series' thousands
    of instance names in a re-sync's check.)"""
    text = "\n".join(names) + "\n"
    if text.isascii() and text.count("\n") == len(names) and _ALL_PORTABLE.fullmatch(text) is not None:
        return True
    return all(map(is_portable, names))


def _ascii(text: str) -> str:
    """``text`` transliterated to ASCII (``anyascii``, imported only for a name that needs
    it: its import costs every command's start a few milliseconds)."""
    if text.isascii():
        return text
    from anyascii import anyascii

    return anyascii(text)


@lru_cache(maxsize=65536)  # folder names repeat across thousands of files
def portable_name(text: str) -> str:
    """One path component that works everywhere: ASCII (``José`` -> ``Jose``, ``ß`` ->
    ``ss``), runs of spaces, control characters and ``/ \\ : * ? " < > |`` become one ``_``
    (none at either end), a leading ``.``/``-`` becomes ``_``, trailing dots go (Windows
    drops them), Windows' reserved names (``CON``, ``NUL``...) get a ``_``, and the name is
    cut to 255 bytes keeping its extension. Empty, ``.`` and ``..`` become ``_``. A name
    that is portable already comes back unchanged (the same object)."""
    text = str(text)
    if is_portable(text):
        return text
    text = unicodedata.normalize("NFC", text)
    text = _ascii(text)
    text = _BAD_RUN.sub("_", text.strip(_STRIP))
    text = re.sub(r"^[.\-]+", "_", text).rstrip(".")
    reserved = _RESERVED.fullmatch(text)
    if reserved:
        text = reserved.group(1) + "_" + (reserved.group(2) or "")
    return fit_name(text or "_")


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[: max(limit, 0)].decode("utf-8", "ignore")


def fit_name(name: str, suffix: str = "", folder: bool = False) -> str:
    """``name`` with ``suffix`` inserted before its extension (at the end of a folder's
    name), cut on a character boundary so that the whole fits in 255 bytes; the extension
    and the suffix are kept whole."""
    found = None if folder else _EXT.search(name)
    ext = found.group(0) if found else ""
    stem = name[: len(name) - len(ext)]
    if len(ext.encode()) + len(suffix.encode()) >= NAME_MAX:  # no room for an extension that long
        stem, ext = name, ""
    stem = _cut(stem, NAME_MAX - len(ext.encode()) - len(suffix.encode()))
    return (stem or "_") + suffix + ext


def identity_suffix(identity: str, length: int = SUFFIX_HEX) -> str:
    """The stable suffix of a remote item: ``~`` and the first hex digits of the SHA-1 of its
    identity (a Flywheel file's ``<container id>/<name>``, a series' ``series/<UID>``, a zip
    member's path)."""
    digest = hashlib.sha1(identity.encode("utf-8", "surrogatepass")).hexdigest()
    return SUFFIX_SEP + digest[:length]


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, checked to stay inside ``root`` (a last line of defence behind
    :func:`portable_name`): no absolute path, no ``..`` part. The check is lexical, so a
    symlink the user placed inside the dropoff is followed, as the user intends."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(f"refusing to write outside the dropoff: {relative}")
    return root / relative


def bids_label(text: str, field: str = "") -> str:
    """A BIDS label: letters and digits only (transliterated, ``ß`` -> ``ss``), without a
    leading ``sub-``/``ses-`` (clpipe's BIDS step adds the prefix back). ``"sub-01"`` ->
    ``"01"``, ``"Pilot 3_b"`` -> ``"Pilot3b"``."""
    text = _ascii(unicodedata.normalize("NFC", str(text)))
    prefix = _BIDS_PREFIX.get(field)
    if prefix and text.lower().startswith(prefix):
        text = text[len(prefix) :]
    label = re.sub(r"[^A-Za-z0-9]", "", text)
    return label or "unknown"


def check_template(template: str, fields=FIELDS, need_field: bool = False) -> list[str]:
    """The fields a layout template uses (from ``fields``); ``ValueError`` naming what is
    wrong. ``need_field``: a template without any field is refused too."""
    used = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc})") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in fields or spec or conversion:
            raise ValueError(f"unknown field {{{field}}} in {template!r}; use {', '.join('{' + f + '}' for f in fields)}")
        used.append(field)
    if template.startswith("/") or ".." in PurePosixPath(template).parts:
        raise ValueError(f"{template!r} must be a relative path without '..'")
    if need_field and not used:
        raise ValueError(
            f"{template!r} uses no field, so every series would land in one folder; use e.g. {{subject}}/{{session}}/{{series}}"
        )
    return used


def field_values(labels: dict[str, str], fields: Iterable[str] = FIELDS) -> tuple[dict[str, str], dict[str, str]]:
    """A template's values twice: as identities (the remote text; a subject or session as
    its BIDS label, so labels that make one BIDS label are one folder) and as portable names."""
    identities = {f: bids_label(labels.get(f, ""), f) if f in BIDS_FIELDS else str(labels.get(f, "")) for f in fields}
    names = {f: v if f in BIDS_FIELDS else portable_name(v) for f, v in identities.items()}
    return identities, names


def template_parts(template: str, identities: dict[str, str], names: dict[str, str]) -> list[tuple[str, str]]:
    """The path parts a layout template makes, each ``(identity, portable name)``: the part
    rendered with the remote values and with their portable forms (the template's own
    text is made portable too)."""
    return [(piece.format(**identities), portable_name(piece.format(**names))) for piece in template.split("/") if piece]


def dicom_format_string(template: str) -> str:
    """The ``DICOMFormatString`` for clpipe's BIDS step: the template up to ``{session}``
    (or ``{subject}``), with a trailing slash."""
    parts = PurePosixPath(template).parts
    for last in ("{session}", "{subject}"):
        for i, part in enumerate(parts):
            if last in part:
                return posixpath.join(*parts[: i + 1]) + "/"
    return ""


def flatten_members(names: Sequence[str]) -> dict[str, str]:
    """Zip member -> file name in the series folder: base names, as ``fw sync`` does, made
    portable; members whose names come out the same are told apart as any other items are
    (:class:`NameResolver`: the member whose name needed no change, else the smallest path,
    keeps it; the others get ``~<hex>`` from their path before the extension), never
    overwritten, and never longer than 255 bytes."""
    resolver = NameResolver()
    folder = resolver.root
    for name in names:
        base = PurePosixPath(str(name).replace("\\", "/")).name
        wanted = portable_name(base)
        resolver.add(folder, name, wanted, wanted == base)
    resolver.resolve()
    return {name: resolver.path(folder, name)[0] for name in names}


class PlannedFolder:
    """A local folder being planned: its sub-folders (remote identity -> [wanted name,
    folder]) and its files (key -> wanted name when the remote name needed no change, else
    (wanted, unchanged?, is a folder)); after :meth:`NameResolver.resolve`, the final names.
    For :class:`StreamedNames`: its number, the hashes that more than one item (or
    sub-folder) wants and, only then, the hashes of all its items' wanted names."""

    __slots__ = ("clash", "dirs", "hashes", "leaves", "number", "path", "renamed")

    def __init__(self) -> None:
        self.dirs: dict[str, list] = {}
        self.leaves: dict[str, str | tuple] = {}
        self.path = ""
        self.renamed = False
        self.hashes = array("Q")  # (StreamedNames: of a folder with a clash, while names are settled)
        self.clash: set[int] = set()
        self.number = -1  # (StreamedNames: its number, once it has one)


class NameResolver:
    """Gives every remote item of one listing its own portable local path, whatever order
    the listing comes in.

    An item is a chain of folders, each ``(identity, wanted name)`` (the identity is the
    remote text the folder stands for, e.g. a subject's label: two labels that make the
    same name are two folders), ending in a file or an unpacked folder identified by its
    key. :meth:`resolve` then settles each folder's names: of the items that want one name
    (compared without case, as SMB/NTFS and macOS do), the one whose remote name needed no
    change keeps it, else the one with the smallest identity; every other one gets a suffix
    from its identity (:func:`identity_suffix`), longer only when two suffixes meet."""

    def __init__(self) -> None:
        self.root = PlannedFolder()

    def folder(self, parts: Iterable[tuple[str, str]]) -> PlannedFolder:
        """The planned folder for a chain of ``(identity, wanted name)``."""
        node = self.root
        for identity, wanted in parts:
            child = node.dirs.get(identity)
            if child is None:
                child = node.dirs[identity] = [wanted, PlannedFolder()]
            node = child[1]
        return node

    @staticmethod
    def add(folder: PlannedFolder, key: str, wanted: str, unchanged: bool, is_folder: bool = False) -> bool:
        """Plan an item ``key`` in ``folder``; False when it is planned already (listed twice)."""
        if key in folder.leaves:
            return False
        folder.leaves[key] = wanted if unchanged and not is_folder else (wanted, unchanged, is_folder)
        return True

    def resolve(self) -> None:
        todo = [self.root]
        while todo:
            node = todo.pop()
            _settle(node)
            for identity, (local, child) in node.dirs.items():
                child.path = f"{node.path}/{local}" if node.path else local
                child.renamed = node.renamed or local != identity
                todo.append(child)

    @staticmethod
    def path(folder: PlannedFolder, key: str, pop: bool = False) -> tuple[str, bool]:
        """(local path, renamed?) of an item after :meth:`resolve`; ``pop`` forgets it."""
        value = folder.leaves.pop(key) if pop else folder.leaves[key]
        name, renamed = (value, folder.renamed) if isinstance(value, str) else (value[0], True)
        return (f"{folder.path}/{name}" if folder.path else name), renamed


class StreamedNames(NameResolver):
    """:class:`NameResolver` for a listing too large to hold (a million files): the same
    names, decided in three passes over a listing kept on disk (:class:`Spill`).

    1. :meth:`note` every item: only the 64-bit hash of its wanted name (without case) is
       kept, with its folder's number, in a :class:`~clpipe.spill.SortedSpill` (on disk in
       ``folder`` beyond 50,000 items: memory does not grow with the listing).
    2. :meth:`find_clashes`: read back sorted, the hashes more than one item or sub-folder
       of a folder has. The items with such a hash are :meth:`add`-ed (a few, as in
       :class:`NameResolver`) in a second pass; :meth:`resolve` then settles them exactly
       as :class:`NameResolver` does, with the folder's other names known by hash (a
       suffixed name is never one of them; two names with one hash only make a suffix
       longer). Only a folder with a clash keeps its hashes for that.
    3. :meth:`final`: every other item keeps its wanted name.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        super().__init__()
        from .spill import SortedSpill

        self._keys = SortedSpill(folder)  # (folder number << 64) | hash, one per item and sub-folder
        self._numbered: list[PlannedFolder] = []

    def _number(self, folder: PlannedFolder) -> int:
        if folder.number < 0:
            folder.number = len(self._numbered)
            self._numbered.append(folder)
        return folder.number

    def folder(self, parts: Iterable[tuple[str, str]]) -> PlannedFolder:
        """As :meth:`NameResolver.folder`, numbered: :meth:`numbered` gives it back."""
        node = super().folder(parts)
        self._number(node)
        return node

    def numbered(self, number: int) -> PlannedFolder:
        """The planned folder whose ``number`` this is (a spilled listing keeps numbers)."""
        return self._numbered[number]

    def note(self, folder: PlannedFolder, wanted: str) -> int:
        """Note an item wanting ``wanted`` in ``folder``: the hash to give :meth:`final`."""
        value = hash(wanted.lower()) & _MASK
        number = folder.number if folder.number >= 0 else self._number(folder)
        self._keys.append((number << 64) | value)
        return value

    def find_clashes(self) -> bool:
        """Find the names more than one item of a folder wants: are there any?"""
        todo = [self.root]
        while todo:  # the sub-folders' names are a folder's names too
            node = todo.pop()
            number = self._number(node)
            for wanted, child in node.dirs.values():
                self._keys.append((number << 64) | (hash(wanted.lower()) & _MASK))
                todo.append(child)
        found = False
        current, previous = -1, -1
        hashes = array("Q")
        for key in self._keys:
            number = key >> 64
            if number != current:
                if current >= 0 and self._numbered[current].clash:
                    self._numbered[current].hashes = hashes
                current, hashes = number, array("Q")
            hashes.append(key & _MASK)
            if key == previous:
                self._numbered[number].clash.add(key & _MASK)
                found = True
            previous = key
        if current >= 0 and self._numbered[current].clash:
            self._numbered[current].hashes = hashes
        self._keys.close()
        return found

    @staticmethod
    def clashes(folder: PlannedFolder, wanted: str) -> bool:
        """Does an item wanting ``wanted`` in ``folder`` share its name (see :meth:`add`)?"""
        return bool(folder.clash) and hash(wanted.lower()) & _MASK in folder.clash

    def resolve(self) -> None:
        todo = [self.root]
        while todo:
            node = todo.pop()
            _settle(node, _HashedNames(node) if node.clash else None)
            node.hashes = array("Q")  # done with: freed
            for identity, (local, child) in node.dirs.items():
                child.path = f"{node.path}/{local}" if node.path else local
                child.renamed = node.renamed or local != identity
                todo.append(child)

    @staticmethod
    def final(folder: PlannedFolder, key: str, wanted: str, unchanged: bool, hashed: int | None = None) -> tuple[str, bool] | None:
        """(local path, renamed?) of an item after :meth:`resolve` (``hashed``: what
        :meth:`note` gave); None for a repeat of an item given already (the listing had it
        twice)."""
        if folder.clash and (hash(wanted.lower()) & _MASK if hashed is None else hashed) in folder.clash:
            if key not in folder.leaves:
                return None
            return NameResolver.path(folder, key, pop=True)
        return (f"{folder.path}/{wanted}" if folder.path else wanted), folder.renamed or not unchanged


class _HashedNames:
    """The names taken in a folder of :class:`StreamedNames`: its items' (by hash) and those
    given meanwhile."""

    def __init__(self, node: PlannedFolder) -> None:
        self._hashes = set(node.hashes)
        self._names: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._names or hash(name) & _MASK in self._hashes

    def add(self, name: str) -> None:
        self._names.add(name)


def _settle(node: PlannedFolder, known: _HashedNames | None = None) -> None:
    """Give every sub-folder and item of ``node`` its own name (see :class:`NameResolver`);
    ``known``: the names of the folder's other items (:class:`StreamedNames`)."""
    # (wanted, unchanged, identity, kind, is_folder); kind 0: a sub-folder, 1: an item
    wants: dict[str, list[tuple]] = {}
    clash = False
    for identity, (wanted, _) in node.dirs.items():
        group = wants.setdefault(wanted.lower(), [])
        group.append((wanted, wanted == identity, identity, 0, True))
        clash = clash or len(group) > 1
    for key, value in node.leaves.items():
        wanted, unchanged, is_folder = (value, True, False) if isinstance(value, str) else value
        group = wants.setdefault(wanted.lower(), [])
        group.append((wanted, unchanged, key, 1, is_folder))
        clash = clash or len(group) > 1
    taken: set[str] | _HashedNames = (
        set(wants) if known is None else known
    )  # every plain name is kept by its winner: suffixes go around them
    if known is not None:
        for name in wants:
            known.add(name)
    finals: dict[tuple[int, str], tuple[str, bool]] = {}  # (kind, identity) -> (name, suffixed?)
    if clash:
        losers = []
        for group in wants.values():
            if len(group) > 1:
                group.sort(key=lambda c: (not c[1], c[2], c[3]))
                losers += group[1:]
        for wanted, _, identity, kind, is_folder in sorted(losers, key=lambda c: (c[2], c[3])):
            for length in _LENGTHS:
                name = fit_name(wanted, identity_suffix(identity, length), is_folder)
                if name.lower() not in taken:
                    break
            else:  # forty hex digits met: cannot happen, but never two items on one name
                n = 2
                while (name := fit_name(wanted, f"{identity_suffix(identity)}-{n}", is_folder)).lower() in taken:
                    n += 1
            taken.add(name.lower())
            finals[(kind, identity)] = (name, True)
    for identity, child in node.dirs.items():
        if (0, identity) in finals:
            child[0] = finals[(0, identity)][0]
    for key, value in node.leaves.items():
        if (1, key) in finals:
            node.leaves[key] = (finals[(1, key)][0],)
        elif not isinstance(value, str):
            wanted, unchanged, _ = value
            node.leaves[key] = wanted if unchanged else (wanted,)


class HashSet:
    """A set of 64-bit hashes in one array (open addressing, at most 70 % of its slots
    used): 11 to 23 bytes a member, where a ``set`` of ints costs about 70."""

    def __init__(self) -> None:
        self._slots = array("q", bytes(8 * 1024))
        self._mask = 1023
        self._count = 0

    def __contains__(self, value: int) -> bool:
        value, slots, mask = value or 1, self._slots, self._mask
        slot = value & mask
        while slots[slot]:
            if slots[slot] == value:
                return True
            slot = (slot + 1) & mask
        return False

    def add(self, value: int) -> bool:
        """Add ``value``: False when it was a member already."""
        value = value or 1  # 0 marks a free slot
        slots, mask = self._slots, self._mask
        slot = value & mask
        while slots[slot]:
            if slots[slot] == value:
                return False
            slot = (slot + 1) & mask
        slots[slot] = value
        self._count += 1
        if self._count > 0.7 * (mask + 1):
            old = slots
            self._mask = mask = 2 * (mask + 1) - 1
            self._slots = slots = array("q", bytes(8 * (mask + 1)))
            for v in old:
                if v:
                    slot = v & mask
                    while slots[slot]:
                        slot = (slot + 1) & mask
                    slots[slot] = v
        return True

    def __len__(self) -> int:
        return self._count


class Claims:
    """The local paths the entries of one run take: the engine's last guard behind the
    sources' :class:`NameResolver`. :meth:`claim` gives an entry its path, or, when another
    entry has that path, when it is a folder above another entry's, or when a folder on it
    is another entry's file or unpacked folder, the path with the entry's suffix on the
    part that clashes. A path is kept as its 64-bit hash (this run only; in a
    :class:`HashSet`: a million entries cost 11 to 23 MB), and every claim is a new one:
    the sources list each remote file once."""

    def __init__(self) -> None:
        self._paths = HashSet()  # hash() of every claimed path
        self._folders: set[str] = set()  # every folder above a claimed path

    def claim(self, path: str, key: str, is_folder: bool = False) -> str:
        parent = path.rpartition("/")[0]
        if (not parent or parent in self._folders) and path not in self._folders and self._paths.add(hash(path)):
            return path  # (the usual case, a million times: a new file in a folder known already)
        if self._clash(path) is None:
            return self._take(path)
        original = path.split("/")
        named = original[:]
        tries: dict[int, int] = {}  # depth of a part that clashed -> suffixes tried on it
        for _ in range(4 * len(original) + 1):
            candidate = "/".join(named)
            depth = self._clash(candidate)
            if depth is None:
                return self._take(candidate)
            n = tries[depth] = tries.get(depth, -1) + 1
            if n >= len(_LENGTHS):
                break
            named[depth - 1] = fit_name(original[depth - 1], identity_suffix(key, _LENGTHS[n]), is_folder or depth < len(named))
        raise ValueError(f"no free local name for {key} at {path}")

    def taken(self, path: str) -> bool:
        """Is ``path`` an entry's path in this run (or a folder above one)?"""
        return hash(path) in self._paths or path in self._folders

    def _clash(self, path: str) -> int | None:
        """How many parts of ``path`` lead to what another entry has (the path itself, or a
        file or unpacked folder above it); None when it is free."""
        if hash(path) in self._paths or path in self._folders:
            return path.count("/") + 1
        parent = path.rpartition("/")[0]
        while parent and parent not in self._folders:  # a folder known already was checked then
            if hash(parent) in self._paths:
                return parent.count("/") + 1
            parent = parent.rpartition("/")[0]
        return None

    def hold(self, path: str) -> None:
        """Take ``path`` as it is (a file in place already, claimed in an earlier run)."""
        self._take(path)

    def _take(self, path: str) -> str:
        self._paths.add(hash(path))
        parent = path.rpartition("/")[0]
        while parent and parent not in self._folders:
            self._folders.add(parent)
            parent = parent.rpartition("/")[0]
        return path


class SpilledClaims:
    """The :class:`Claims` of a run whose source promises every entry a path of its own
    (``HasUniquePaths``: it named them all from its whole listing, :class:`NameResolver`):
    the engine :meth:`hold`-s the path of each entry it finds in place, which is only kept
    on disk (a :class:`~clpipe.spill.Spill` in ``folder``), so a no-op re-sync of a million
    files holds none of them. The guard is built from them only when it is needed:
    :meth:`check` for the entries the run will fetch or move (each may still be told
    apart, as :meth:`Claims.claim` does), or the first :meth:`taken`."""

    def __init__(self, folder: str | Path | None = None) -> None:
        from .spill import Spill

        self._spill = Spill(folder)
        self._claims: Claims | None = None
        self.hold = self._spill.append  # the engine's listing loop: an entry in place (a million times)

    def claim(self, path: str, key: str, is_folder: bool = False) -> str:
        """(After :meth:`check`: as :meth:`Claims.claim`.)"""
        return (self._claims or self._build()).claim(path, key, is_folder)

    def check(self, pending: Iterable[tuple[str, str, bool]]) -> list[str | ValueError]:
        """The paths of the ``pending`` entries ``(path, key, is a folder)``, the entries
        to fetch or move, claimed in this order after every path held, each told apart as
        :class:`Claims` would (its ValueError: no free name)."""
        claims = self._claims or self._build()
        finals: list[str | ValueError] = []
        for path, key, is_folder in pending:
            try:
                finals.append(claims.claim(path, key, is_folder))
            except ValueError as exc:
                finals.append(exc)
        return finals

    def taken(self, path: str) -> bool:
        """Is ``path`` an entry's path in this run (or a folder above one)?"""
        return (self._claims or self._build()).taken(path)

    def _build(self) -> Claims:
        """The guard, holding every path held."""
        claims = Claims()
        for path in self._spill:
            claims.hold(path)
        self._spill.close()
        self._claims = claims
        return claims
