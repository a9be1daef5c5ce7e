"""A small streaming msgpack walker over a seekable file.

msgpack.Unpacker materialises every value it returns, a `bin` of a whole
blob included; a pack of several GB cannot be read that way in bounded
memory.  The walker reads type headers itself, so that a caller can step
over (or hash, or copy) a `bin` by its offset and length without loading
it, and hands whole small values (a commit map, a snapshot map) to
msgpack.Unpacker, which decodes them at C speed.

    w = Walker(f, start, end)
    n = w.map_header()              # entries of a map
    key = w.str()
    off, length = w.bin_span()      # the bytes of a bin, skipped
    commit = w.value()              # one whole value, decoded
    for c in w.values(n): ...       # n whole values in a row
    w.skip()                        # any value, without decoding

Every malformed or truncated input raises PackError (a ValueError) naming
the offset.
"""
from __future__ import annotations

import struct

import msgpack

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Iterator

#: the largest single decoded value (a commit map, a root snapshot's delta)
MAX_VALUE_BYTES = 1 << 30


class PackError(ValueError):
    """A pack (or msgpack value inside it) is malformed."""


class _View:
    """A read-only file-like window [pos, end) of a file (for Unpacker)."""

    def __init__(self, f: BinaryIO, pos: int, end: int) -> None:
        self.f, self.pos, self.end = f, pos, end

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.end - self.pos:
            n = self.end - self.pos
        if n <= 0:
            return b""
        self.f.seek(self.pos)
        b = self.f.read(n)
        self.pos += len(b)
        return b


# type byte -> (kind, how many bytes of length/arg follow, fixed arg)
def _head_table() -> list:
    t: list = [None] * 256
    for b in range(0x00, 0x80):
        t[b] = ("int", 0, b)
    for b in range(0x80, 0x90):
        t[b] = ("map", 0, b & 0x0F)
    for b in range(0x90, 0xA0):
        t[b] = ("array", 0, b & 0x0F)
    for b in range(0xA0, 0xC0):
        t[b] = ("str", 0, b & 0x1F)
    for b in range(0xE0, 0x100):
        t[b] = ("int", 0, b - 0x100)
    t[0xC0] = ("nil", 0, None)
    t[0xC2] = ("bool", 0, False)
    t[0xC3] = ("bool", 0, True)
    t[0xC4], t[0xC5], t[0xC6] = ("bin", 1, None), ("bin", 2, None), ("bin", 4, None)
    t[0xC7], t[0xC8], t[0xC9] = ("ext", 1, None), ("ext", 2, None), ("ext", 4, None)
    t[0xCA], t[0xCB] = ("float", 4, None), ("float", 8, None)
    t[0xCC], t[0xCD], t[0xCE], t[0xCF] = (("uint", n, None) for n in (1, 2, 4, 8))
    t[0xD0], t[0xD1], t[0xD2], t[0xD3] = (("sint", n, None) for n in (1, 2, 4, 8))
    for b, n in zip(range(0xD4, 0xD9), (1, 2, 4, 8, 16)):
        t[b] = ("fixext", 0, n)
    t[0xD9], t[0xDA], t[0xDB] = ("str", 1, None), ("str", 2, None), ("str", 4, None)
    t[0xDC], t[0xDD] = ("array", 2, None), ("array", 4, None)
    t[0xDE], t[0xDF] = ("map", 2, None), ("map", 4, None)
    return t


_HEAD = _head_table()
_UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I"),
         8: struct.Struct(">Q")}
_SINT = {1: struct.Struct(">b"), 2: struct.Struct(">h"), 4: struct.Struct(">i"),
         8: struct.Struct(">q")}


class Walker:
    """Reads msgpack values from file `f` between byte `start` and `end`
    (see the module docstring).  The walker seeks before every read, so
    other readers of the same file object do not disturb it."""

    def __init__(self, f: BinaryIO, start: int = 0, end: int | None = None,
                 bufsize: int = 1 << 16) -> None:
        if end is None:
            f.seek(0, 2)
            end = f.tell()
        self.f, self.pos, self.end, self.bufsize = f, start, end, bufsize
        self._buf, self._bufpos = b"", start

    # -- bytes -------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise PackError(f"truncated at byte {self.pos} (needs {n} more, "
                            f"{self.end - self.pos} left)")
        off = self.pos - self._bufpos
        if off < 0 or off + n > len(self._buf):
            self.f.seek(self.pos)
            self._buf = self.f.read(max(n, min(self.bufsize, self.end - self.pos)))
            self._bufpos, off = self.pos, 0
            if len(self._buf) < n:
                raise PackError(f"file ends at byte {self.pos + len(self._buf)}")
        self.pos += n
        return self._buf[off:off + n]

    def peek(self, n: int) -> bytes:
        """Up to n bytes from the current position, not consumed.  A miss
        reads only those bytes (a peek usually precedes a skip over a bin,
        whose bytes are better not read at all)."""
        n = min(n, self.end - self.pos)
        off = self.pos - self._bufpos
        if off < 0 or off + n > len(self._buf):
            self.f.seek(self.pos)
            self._buf = self.f.read(n)
            self._bufpos, off = self.pos, 0
        return self._buf[off:off + n]

    def skip_bytes(self, n: int) -> None:
        if self.pos + n > self.end:
            raise PackError(f"truncated at byte {self.pos}: a value of {n} bytes "
                            f"runs past the end ({self.end})")
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= self.end

    # -- headers -----------------------------------------------------------

    def head(self) -> tuple[str, Any]:
        """(kind, arg) of the next value: map/array -> entry count,
        str/bin/ext -> byte length, int -> value, nil/bool/float -> value."""
        at = self.pos
        b = self._take(1)[0]
        h = _HEAD[b]
        if h is None:
            raise PackError(f"byte {at}: 0x{b:02x} is not a msgpack type")
        kind, nlen, arg = h
        if nlen == 0:
            if kind == "fixext":
                self._take(1)
                return "ext", arg
            return kind, arg
        if kind == "uint":
            return "int", _UINT[nlen].unpack(self._take(nlen))[0]
        if kind == "sint":
            return "int", _SINT[nlen].unpack(self._take(nlen))[0]
        if kind == "float":
            return "float", struct.unpack(">f" if nlen == 4 else ">d", self._take(nlen))[0]
        n = _UINT[nlen].unpack(self._take(nlen))[0]
        if kind == "ext":
            self._take(1)
        return kind, n

    def _expect(self, want: str) -> Any:
        at = self.pos
        kind, arg = self.head()
        if kind != want:
            raise PackError(f"byte {at}: expected a {want}, found a {kind}")
        return arg

    def map_header(self) -> int:
        return self._expect("map")

    def array_header(self) -> int:
        return self._expect("array")

    def str(self) -> str:
        n = self._expect("str")
        at = self.pos
        raw = self._take(n) if n <= self.bufsize else self._read_big(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PackError(f"byte {at}: a string that is not UTF-8") from e

    def _read_big(self, n: int) -> bytes:
        if n > MAX_VALUE_BYTES or self.pos + n > self.end:
            raise PackError(f"byte {self.pos}: a value of {n} bytes")
        self.f.seek(self.pos)
        b = self.f.read(n)
        if len(b) != n:
            raise PackError(f"truncated at byte {self.pos}")
        self.pos += n
        return b

    def int(self) -> int:
        return self._expect("int")

    def bin_span(self) -> tuple[int, int]:
        """Steps over a bin: (offset of its first byte, length)."""
        n = self._expect("bin")
        off = self.pos
        self.skip_bytes(n)
        return off, n

    def nil_or_str(self) -> str | None:
        at = self.pos
        kind, arg = self.head()
        if kind == "nil":
            return None
        if kind != "str":
            raise PackError(f"byte {at}: expected a string or nil, found a {kind}")
        self.pos = at
        return self.str()

    # -- whole values --------------------------------------------------------

    def skip(self) -> None:
        """Step over one value of any shape (iteratively)."""
        todo = 1
        while todo:
            todo -= 1
            kind, arg = self.head()
            if kind == "map":
                todo += 2 * arg
            elif kind == "array":
                todo += arg
            elif kind in ("str", "bin", "ext"):
                self.skip_bytes(arg)

    def values(self, count: int) -> Iterator[Any]:
        """Decode `count` consecutive whole values with msgpack (map keys
        must be strings; str must be UTF-8)."""
        if count <= 0:
            return
        view = _View(self.f, self.pos, self.end)
        u = msgpack.Unpacker(view, raw=False, strict_map_key=True,
                             max_buffer_size=MAX_VALUE_BYTES, read_size=1 << 16)
        start = self.pos
        try:
            for _ in range(count):
                yield u.unpack()
        except msgpack.OutOfData as e:
            raise PackError(f"truncated inside the values starting at byte {start}") from e
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as e:
            raise PackError(f"bad msgpack after byte {start}: {e}") from e
        self.pos = start + u.tell()
        self._buf, self._bufpos = b"", self.pos

    def value(self) -> Any:
        """One whole value, decoded."""
        (v,) = list(self.values(1))
        return v
