"""The dynamic loader's cache (/etc/ld.so.cache) and ELF sonames, read and written here.

NVIDIA's CDI specs end with a hook that runs ldconfig so that the container's
loader finds the injected driver libraries (libcuda.so.1...). Running a host
binary on a path inside an untrusted image, as root, is what this project never
does, and the image's own ldconfig is the image's: so the prolog does the hook's
work itself. It reads each injected library's SONAME, makes the soname link
ldconfig would make, and writes a new cache: the image's entries plus the
injected ones, in glibc's format ("glibc-ld.so.cache1.1", glibc 2.7 and newer; the
only format written since 2.32), sorted the way the loader's binary search needs.
"""

from __future__ import annotations

import struct

MAGIC = b"glibc-ld.so.cache1.1"
HEADER = struct.Struct("<20sII B3x I 12x")  # magic+version, nlibs, len_strings, flags, ext
ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap
FLAG_X86_64_LIBC6 = 0x0303  # FLAG_ELF_LIBC6 | FLAG_X8664_LIB64
FLAG_AARCH64_LIBC6 = 0x0A03  # FLAG_ELF_LIBC6 | FLAG_AARCH64_LIB64
CACHE_FLAGS = 2  # cache_file_new.flags: little-endian


class Entry:
    __slots__ = ("flags", "hwcap", "osversion", "path", "soname")

    def __init__(self, soname: bytes, path: bytes, flags: int, osversion: int = 0,
                 hwcap: int = 0) -> None:  # fmt: skip
        self.soname, self.path, self.flags = soname, path, flags
        self.osversion, self.hwcap = osversion, hwcap


def read(data: bytes) -> list[Entry] | None:
    """The entries of a cache in the new format; None for anything else (an old-format
    or foreign file: then the image keeps it, and the new cache has only ours)."""
    start = data.find(MAGIC)
    if start < 0 or len(data) < start + HEADER.size:
        return None
    _magic, count, _strings, _flags, _ext = HEADER.unpack_from(data, start)
    table = start + HEADER.size
    if table + count * ENTRY.size > len(data):
        return None
    entries = []
    for number in range(count):
        flags, key, value, osversion, hwcap = ENTRY.unpack_from(data, table + number * ENTRY.size)
        # Offsets are from the new-format header (the whole file since glibc 2.32).
        soname, path = _string(data, start + key), _string(data, start + value)
        if soname is None or path is None:
            return None
        entries.append(Entry(soname, path, flags, osversion, hwcap))
    return entries


def _string(data: bytes, offset: int) -> bytes | None:
    end = data.find(b"\0", offset)
    return None if offset >= len(data) or end < 0 else data[offset:end]


def write(entries: list[Entry]) -> bytes:
    """A new-format cache holding ``entries`` (later ones replace earlier sonames of the
    same flags), sorted as ldconfig sorts them, without the hwcaps extension."""
    unique: dict[tuple[bytes, int, int], Entry] = {}
    for entry in entries:
        unique[(entry.soname, entry.flags, entry.hwcap)] = entry
    ordered = sorted(unique.values(), key=_sort_key)
    strings = bytearray()
    offsets: dict[bytes, int] = {}
    base = HEADER.size + len(ordered) * ENTRY.size
    for entry in ordered:
        for text in (entry.soname, entry.path):
            if text not in offsets:
                offsets[text] = base + len(strings)
                strings += text + b"\0"
    out = bytearray(HEADER.pack(MAGIC, len(ordered), len(strings), CACHE_FLAGS, 0))
    for entry in ordered:
        out += ENTRY.pack(entry.flags, offsets[entry.soname], offsets[entry.path],
                          entry.osversion, entry.hwcap)  # fmt: skip
    return bytes(out + strings)


def _sort_key(entry: Entry) -> tuple[_Descending, int, int]:
    """ldconfig's order: sonames descending by _dl_cache_libcmp, then flags and hwcap
    descending; the loader's binary search relies on it."""
    return (_Descending(entry.soname), -entry.flags, -entry.hwcap)


class _Descending:
    """A soname ordered the reverse of glibc's _dl_cache_libcmp (digit runs compared
    as numbers), for sorted()."""

    __slots__ = ("key",)

    def __init__(self, soname: bytes) -> None:
        self.key = soname

    def __lt__(self, other: _Descending) -> bool:
        return libcmp(self.key, other.key) > 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and libcmp(self.key, other.key) == 0

    __hash__ = None  # type: ignore[assignment]


def libcmp(one: bytes, two: bytes) -> int:
    """glibc's _dl_cache_libcmp: like strcmp, but runs of digits compare as numbers, and
    a digit sorts after any other character."""
    i = j = 0
    while i < len(one):
        a = one[i]
        b = two[j] if j < len(two) else 0
        if 48 <= a <= 57:
            if not 48 <= b <= 57:
                return 1
            start_i, start_j = i, j
            while i < len(one) and 48 <= one[i] <= 57:
                i += 1
            while j < len(two) and 48 <= two[j] <= 57:
                j += 1
            difference = int(one[start_i:i]) - int(two[start_j:j])
            if difference:
                return difference
        elif 48 <= b <= 57:
            return -1
        elif a != b:
            return a - b
        else:
            i += 1
            j += 1
    return 0 - (two[j] if j < len(two) else 0)


# --- ELF -----------------------------------------------------------------------------------

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_SONAME = 0, 5, 14
EM_X86_64, EM_AARCH64 = 62, 183


def soname(data: bytes) -> tuple[bytes, int] | None:
    """(DT_SONAME, cache flags) of a 64-bit little-endian ELF shared library, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # only ELFCLASS64, little-endian
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = {EM_X86_64: FLAG_X86_64_LIBC6, EM_AARCH64: FLAG_AARCH64_LIBC6}.get(machine)
    if flags is None:
        return None
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads, dynamic = [], None
    for number in range(phnum):
        offset = phoff + number * phentsize
        if offset + 56 > len(data):
            return None
        kind, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data,
                                                                               offset)  # fmt: skip
        if kind == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif kind == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None
    strtab = name_offset = None
    for offset in range(dynamic[0], min(dynamic[0] + dynamic[1], len(data) - 15), 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == DT_NULL:
            break
        if tag == DT_STRTAB:
            strtab = value
        elif tag == DT_SONAME:
            name_offset = value
    if strtab is None or name_offset is None:
        return None
    for vaddr, file_offset, size in loads:  # DT_STRTAB is an address: map it to the file
        if vaddr <= strtab < vaddr + size:
            name = _string(data, strtab - vaddr + file_offset + name_offset)
            return None if not name else (name, flags)
    return None
