"""The mpack (SPEC 2, 2.1): writing and reading v0, v1 and v2 packs.

Writing
  PackWriter(path, version=2)      streams a pack to a file: commits and
                                   snapshots, blobs from bytes or from a
                                   byte range of another file; v2 frames of
                                   a few MiB (zstd level 6), blobs in path
                                   order (all versions of a path together,
                                   oldest first), a large blob in its own
                                   frame.  close() -> summary with mpack_key.
  build_mpack(...) -> bytes        v0/v1/v2 in memory (small packs, tests)

Reading
  read_pack(f) -> PackIndex        one pass over a pack file in bounded
                                   memory: commits, snapshots, branch heads
                                   decoded; blobs located (offset, length, or
                                   frame + place) and, with verify, every
                                   blob hashed against its id.  v2 frames
                                   are decompressed with the SPEC 2.1 bounds
                                   (size, 64 MiB per multi-blob frame, a
                                   total budget); every problem is a
                                   PackError naming it.
  PackIndex.open_blob / read_blob  a blob's bytes back from the file
  parse_mpack(bytes) -> dict       the whole pack in memory (compat shape)

Nothing here talks to a server.
"""
from __future__ import annotations

import collections.abc
import hashlib
import io
import struct

import msgpack

from .ids import valid_id
from .mpwalk import PackError, Walker

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable, Iterator, Mapping

MPACK_MAGIC = b"MUSE"
FRAME_MAX = 64 << 20            # decompressed bytes of a frame of several blobs
DEFAULT_FRAME_BYTES = 4 << 20   # what the writer aims for
INMEM_FRAME = 8 << 20           # frames up to this size are decompressed in memory
SPOOL_MEMORY = 16 << 20         # blob bytes a PackWriter keeps in memory before spilling to disk
# zstd level of the frames the client writes. 6, not zstd's default 3:
# libuv's history converts into 7.82 MB instead of 8.63 MB (0.47x git's
# pack rather than 0.52x: what a v2-pushed repository stores) for 0.26 s
# more of a 3.9 s conversion; 9 gave 7.37 MB for 0.66 s more, but it is
# not monotonic (on some files level 9 is larger than 3: a column of
# sequential numbers, 479 KB against 388 KB; 6 gave 330 KB).
DEFAULT_LEVEL = 6
DEFAULT_MAX_UNPACKED = 17179869184   # the server's MUSEHUB_MAX_UNPACKED_BYTES default
CHUNK = 1 << 20

__all__ = ["PackError", "PackWriter", "PackIndex", "read_pack", "build_mpack",
           "parse_mpack", "MPACK_MAGIC", "FRAME_MAX"]


def _zstd():
    import zstandard  # python3-zstandard; imported when a v2 pack is touched
    return zstandard


# ---------------------------------------------------------------------------
# msgpack headers (minimal encodings, as msgpack itself writes them)
# ---------------------------------------------------------------------------

def _header(n: int, fix: int | None, fix_max: int, c16: int, c32: int,
            c8: int | None = None) -> bytes:
    """The shortest msgpack header of a length: fix form (`fix` | n) below
    `fix_max`, else 8-bit (`c8`), 16-bit (`c16`) or 32-bit (`c32`)."""
    if fix is not None and n < fix_max:
        return bytes([fix | n])
    if c8 is not None and n < 0x100:
        return bytes([c8, n])
    if n < 0x10000:
        return bytes([c16]) + struct.pack(">H", n)
    return bytes([c32]) + struct.pack(">I", n)


def _bin_header(n: int) -> bytes:
    return _header(n, None, 0, 0xC5, 0xC6, c8=0xC4)


def _array_header(n: int) -> bytes:
    return _header(n, 0x90, 16, 0xDC, 0xDD)


def _map_header(n: int) -> bytes:
    return _header(n, 0x80, 16, 0xDE, 0xDF)


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


# ---------------------------------------------------------------------------
# Zstandard frames: structure check (RFC 8878 section 3.1.1) and bounded
# decompression
# ---------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_frame_length(f: BinaryIO, off: int, avail: int) -> int:
    """Length in bytes of the one Zstandard frame starting at `off` (at most
    `avail` bytes), found by walking its header and block headers.  Raises
    PackError when the bytes are not a frame or it runs past `avail`."""
    f.seek(off)
    hdr = f.read(min(avail, 18))
    if len(hdr) < 5 or hdr[:4] != _ZSTD_MAGIC:
        raise PackError("frame data is not a Zstandard frame (bad magic)")
    fhd = hdr[4]
    if fhd & 0x08:
        raise PackError("Zstandard frame header has its reserved bit set")
    fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    n = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    n += (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = off + n
    end = off + avail
    while True:
        if pos + 3 > end:
            raise PackError("Zstandard frame is truncated (block header)")
        f.seek(pos)
        bh = f.read(3)
        if len(bh) != 3:
            raise PackError("Zstandard frame is truncated")
        v = bh[0] | (bh[1] << 8) | (bh[2] << 16)
        last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
        if btype == 3:
            raise PackError("Zstandard block of the reserved type")
        pos += 3 + (1 if btype == 1 else bsize)
        if pos > end:
            raise PackError("Zstandard frame is truncated (block content)")
        if last:
            break
    if checksum:
        pos += 4
        if pos > end:
            raise PackError("Zstandard frame is truncated (checksum)")
    return pos - off


def _ranges(f: BinaryIO, off: int, length: int, what: str) -> Iterator[bytes]:
    """File bytes [off, off+length) in pieces of at most 1 MiB."""
    while length:
        f.seek(off)
        b = f.read(min(CHUNK, length))
        if not b:
            raise PackError(f"pack ends inside {what}")
        off += len(b)
        length -= len(b)
        yield b


class _Bounded:
    """The decompression sink: passes at most `size` bytes on, else stops
    the decompressor (the zip-bomb guard)."""

    def __init__(self, size: int, out: Callable[[memoryview], None]) -> None:
        self.size, self.out, self.n = size, out, 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        if self.n > self.size:
            raise PackError(f"frame decompresses to more than its size ({self.size} bytes)")
        if b:
            self.out(memoryview(b))
        return len(b)


def inflate(f: BinaryIO, off: int, length: int, codec: str, size: int,
            out: Callable[[memoryview], None]) -> None:
    """Decompress a frame's `data` (file bytes [off, off+length)) and hand
    the decompressed bytes to `out` in pieces of at most 1 MiB.  Exactly
    `size` bytes must come out, from exactly one Zstandard frame that fills
    the data (codec zstd), or the data must be the bytes (codec none)."""
    if codec == "none":
        if length != size:
            raise PackError(f"frame of codec none holds {length} bytes, size says {size}")
        for b in _ranges(f, off, length, "a frame"):
            out(memoryview(b))
        return
    if codec != "zstd":
        raise PackError(f"unknown frame codec {codec!r}")
    flen = zstd_frame_length(f, off, length)
    if flen != length:
        raise PackError(f"frame data holds {length - flen} bytes after its Zstandard frame")
    sink = _Bounded(size, out)
    dec = _zstd().ZstdDecompressor().stream_writer(sink, write_size=CHUNK,
                                                   write_return_read=True, closefd=False)
    try:
        for b in _ranges(f, off, length, "a frame"):
            dec.write(b)
        dec.flush()
    except _zstd().ZstdError as e:
        raise PackError(f"frame does not decompress: {e}") from e
    if sink.n != size:
        raise PackError(f"frame decompresses to {sink.n} bytes, size says {size}")


class _Splitter:
    """Cuts a frame's decompressed stream into its blobs; hashes each one
    against its id (verify) and/or hands the pieces to on_blob."""

    def __init__(self, blobs: list, verify: bool,
                 on_piece: Callable[[str, memoryview, bool], None] | None) -> None:
        self.blobs, self.verify, self.on_piece = blobs, verify, on_piece
        self.i, self.left = -1, 0
        self.h = None
        self._next()

    def _next(self) -> None:
        while True:
            if self.i >= 0:
                self._finish()
            self.i += 1
            if self.i >= len(self.blobs):
                self.left = -1
                return
            self.left = self.blobs[self.i][1]
            self.h = hashlib.sha256() if self.verify else None
            if self.left:
                return

    def _finish(self) -> None:
        oid = self.blobs[self.i][0]
        if self.h is not None:
            got = "sha256:" + self.h.hexdigest()
            if got != oid:
                raise PackError(f"blob {oid} content hashes to {got}")
        if self.on_piece:
            self.on_piece(oid, memoryview(b""), True)

    def __call__(self, mv: memoryview) -> None:
        while len(mv):
            if self.left < 0:
                raise PackError("frame holds more bytes than its blobs")
            k = min(self.left, len(mv))
            piece = mv[:k]
            if self.h is not None:
                self.h.update(piece)
            if self.on_piece:
                self.on_piece(self.blobs[self.i][0], piece, False)
            self.left -= k
            mv = mv[k:]
            if self.left == 0:
                self._next()

    def done(self) -> None:
        if self.left > 0:
            raise PackError("frame ends inside a blob")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

class PackIndex:
    """What read_pack found in one pack file.

    version        0, 1 or 2
    commits        list of commit maps (file order)
    snapshots      list of snapshot maps (file order)
    branch_heads   dict branch -> commit id
    blobs          dict object id -> location: ("raw", offset, length) for
                   v0/v1, ("frame", frame number, start, length) for v2
    frames         v2: list of (codec, size, data offset, data length,
                   [(object id, length)])
    unpacked_bytes v2: decompressed bytes of every frame (meta included)
    blob_bytes     sum of the blob lengths
    """

    def __init__(self) -> None:
        self.version = 0
        self.commits: list[dict] = []
        self.snapshots: list[dict] = []
        self.branch_heads: dict[str, str] = {}
        self.blobs: dict[str, tuple] = {}
        self.frames: list[tuple] = []
        self.unpacked_bytes = 0
        self.blob_bytes = 0
        self.path: str | None = None
        #: v0/v1: later occurrences of an id already in `blobs` (offset, length)
        self.dups: list[tuple[str, int, int]] = []

    def blob_length(self, oid: str) -> int:
        loc = self.blobs[oid]
        return loc[2] if loc[0] == "raw" else loc[3]

    def copy_blob(self, f: BinaryIO, oid: str, write: Callable[[memoryview], Any]) -> None:
        """Hand the content of one blob to `write` in pieces of at most 1
        MiB (a v2 blob decompresses its frame, streaming, and passes on
        only its own bytes): bounded memory whatever the blob's size."""
        loc = self.blobs[oid]
        if loc[0] == "raw":
            for b in _ranges(f, loc[1], loc[2], "a blob"):
                write(memoryview(b))
            return
        _, fi, start, length = loc
        codec, size, doff, dlen, _blobs = self.frames[fi]
        at = [0]

        def out(mv: memoryview) -> None:
            a = at[0]
            at[0] = a + len(mv)
            lo, hi = max(start - a, 0), min(start + length - a, len(mv))
            if lo < hi:
                write(mv[lo:hi])
        inflate(f, doff, dlen, codec, size, out)

    def read_blob(self, f: BinaryIO, oid: str) -> bytes:
        parts: list[bytes] = []
        self.copy_blob(f, oid, lambda mv: parts.append(bytes(mv)))
        return b"".join(parts)

    def frame_blobs(self, f: BinaryIO, fi: int) -> dict[str, bytes]:
        """Every blob of v2 frame `fi`, decompressed (frames are <= 64 MiB
        unless they hold one blob)."""
        codec, size, doff, dlen, blobs = self.frames[fi]
        parts: dict[str, list] = {}
        sp = _Splitter(blobs, False,
                       lambda oid, mv, end: parts.setdefault(oid, []).append(bytes(mv)))
        inflate(f, doff, dlen, codec, size, sp)
        return {oid: b"".join(v) for oid, v in parts.items()}


def _read_meta_keys(w: Walker, n: int, idx: PackIndex, allowed: set[str],
                    blob_cb: Callable[[Walker, str], None] | None, seen: set[str]) -> None:
    """Reads the n remaining entries of a body (or meta) map."""
    for _ in range(n):
        key = w.str()
        if key in seen and key in ("commits", "snapshots", "branch_heads", "blobs",
                                   "objects", "frames", "meta"):
            raise PackError(f"the key {key!r} appears twice")
        seen.add(key)
        if key in ("commits", "snapshots") and key in allowed:
            cnt = w.array_header()
            lst = idx.commits if key == "commits" else idx.snapshots
            for v in w.values(cnt):
                if not isinstance(v, dict):
                    raise PackError(f"a {key[:-1]} is not a map")
                lst.append(v)
        elif key == "branch_heads" and key in allowed:
            at = w.pos
            kind, _ = w.head()
            w.pos = at
            if kind == "nil":
                w.skip()
                continue
            bh = w.value()
            if not isinstance(bh, dict):
                raise PackError("branch_heads is not a map")
            idx.branch_heads.update(bh)
        elif key in ("blobs", "objects", "frames", "meta") and blob_cb is not None:
            blob_cb(w, key)
        else:
            w.skip()


_V1_HEAD = b"\x82\xa9object_id\xd9\x47"     # {object_id: <71-byte str>,
_V1_CONTENT = b"\xa7content"                  #  content: <bin>}
_V1_PEEK = len(_V1_HEAD) + 71 + len(_V1_CONTENT) + 5


def _v1_blob_head(w: Walker) -> tuple[str, tuple[int, int]] | None:
    """The common shape of a v1 blob entry, read in one slice: (id, (offset,
    length)) with the walker past it, or None (the caller walks it key by
    key; nothing consumed)."""
    b = w.peek(_V1_PEEK)
    i = len(_V1_HEAD) + 71
    if not b.startswith(_V1_HEAD) or b[i:i + 8] != _V1_CONTENT or len(b) < i + 10:
        return None
    t = b[i + 8]
    if t == 0xC4:
        n, hl = b[i + 9], 2
    elif t == 0xC5 and len(b) >= i + 11:
        n, hl = struct.unpack(">H", b[i + 9:i + 11])[0], 3
    elif t == 0xC6 and len(b) >= i + 13:
        n, hl = struct.unpack(">I", b[i + 9:i + 13])[0], 5
    else:
        return None
    try:
        oid = b[len(_V1_HEAD):len(_V1_HEAD) + 71].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not valid_id(oid):
        raise PackError(f"blob with bad id {oid!r}")
    w.pos += i + 8 + hl
    off = w.pos
    w.skip_bytes(n)
    return oid, (off, n)


def read_pack(f: BinaryIO, *, verify: bool = True, start: int = 0,
              end: int | None = None, max_unpacked: int = DEFAULT_MAX_UNPACKED,
              on_blob: Callable[[str, memoryview, bool], None] | None = None,
              progress: Callable[[int], None] | None = None) -> PackIndex:
    """Index (and, with verify, check every blob of) the pack in file `f`.

    on_blob(object_id, piece, last) receives every blob's content in
    pieces, in file order, `last` True once at the end of each blob (with
    an empty piece): a caller can write blobs out during the one pass.
    progress(bytes_done) is called now and then.
    Raises PackError on anything the SPEC refuses (2, 2.1)."""
    idx = PackIndex()
    if end is None:
        f.seek(0, 2)
        end = f.tell()
    f.seek(start)
    head = f.read(5)
    if head[:4] == MPACK_MAGIC:
        if len(head) < 5 or head[4] not in (1, 2):
            raise PackError(f"unsupported mpack version byte {head[4:5]!r}")
        idx.version = head[4]
        body = start + 5
    else:
        idx.version = 0
        body = start
    w = Walker(f, body, end)
    n = w.map_header()
    seen: set[str] = set()
    unpacked = [0]

    def v1_blobs(w: Walker, key: str) -> None:
        if idx.version == 2:
            raise PackError(f"a v2 pack carries `{key}` (blobs go in frames)")
        if key not in ("blobs", "objects"):
            w.skip()
            return
        cnt = w.array_header()
        for _ in range(cnt):
            fast = _v1_blob_head(w)
            if fast is not None:
                _blob_raw(*fast)
                continue
            m = w.map_header()
            oid, span = None, None
            for _ in range(m):
                k = w.str()
                if k == "object_id":
                    oid = w.str()
                elif k == "content":
                    span = w.bin_span()
                else:
                    w.skip()
            if not valid_id(oid):
                raise PackError(f"blob with bad id {oid!r}")
            if span is None:
                raise PackError(f"blob {oid} without bin content")
            _blob_raw(oid, span)

    def _blob_raw(oid: str, span: tuple[int, int]) -> None:
        off, length = span
        if oid in idx.blobs and not verify:
            idx.dups.append((oid, off, length))
            return  # a repeated id: with verify, its hash proves it identical
        h = hashlib.sha256() if verify else None
        if h is not None or on_blob is not None:
            for b in _ranges(f, off, length, "a blob"):
                mv = memoryview(b)
                if h is not None:
                    h.update(mv)
                if on_blob is not None and oid not in idx.blobs:
                    on_blob(oid, mv, False)
            if h is not None:
                got = "sha256:" + h.hexdigest()
                if got != oid:
                    raise PackError(f"blob {oid} content hashes to {got}")
            if on_blob is not None and oid not in idx.blobs:
                on_blob(oid, memoryview(b""), True)
        if oid not in idx.blobs:
            idx.blobs[oid] = ("raw", off, length)
            idx.blob_bytes += length
        if progress:
            progress(off + length - start)

    def frame_map(w: Walker, is_meta: bool) -> tuple[str, int, list, int, int]:
        m = w.map_header()
        codec = size = blobs = data = None
        for _ in range(m):
            k = w.str()
            if k == "codec":
                codec = w.str()
            elif k == "size":
                size = w.int()
            elif k == "blobs":
                blobs = []
                for _ in range(w.array_header()):
                    if w.array_header() != 2:
                        raise PackError("a frame's blob entry is not [object_id, length]")
                    oid = w.str()
                    ln = w.int()
                    if not valid_id(oid):
                        raise PackError(f"frame blob with bad id {oid!r}")
                    if ln < 0:
                        raise PackError(f"frame blob {oid} with negative length")
                    blobs.append((oid, ln))
            elif k == "data":
                data = w.bin_span()
            else:
                w.skip()
        what = "the meta frame" if is_meta else "a frame"
        if codec not in ("zstd", "none"):
            raise PackError(f"{what} has codec {codec!r} (zstd or none)")
        if not isinstance(size, int) or size < 0:
            raise PackError(f"{what} without a valid size")
        if data is None:
            raise PackError(f"{what} without data")
        if is_meta:
            if blobs is not None:
                raise PackError("the meta frame lists blobs")
        else:
            if blobs is None:
                raise PackError("a frame without blobs")
            if sum(b[1] for b in blobs) != size:
                raise PackError(f"a frame's blob lengths add up to {sum(b[1] for b in blobs)}, "
                                f"its size is {size}")
            if size > FRAME_MAX and len(blobs) > 1:
                raise PackError(f"a frame of {len(blobs)} blobs has size {size} "
                                f"(over {FRAME_MAX})")
        unpacked[0] += size
        if unpacked[0] > max_unpacked:
            raise PackError(f"the frames decompress to more than {max_unpacked} bytes")
        return codec, size, blobs or [], data[0], data[1]

    def v2_keys(w: Walker, key: str) -> None:
        if idx.version != 2:
            if key in ("blobs", "objects"):
                return v1_blobs(w, key)
            w.skip()
            return
        if key in ("blobs", "objects"):
            raise PackError(f"a v2 pack carries `{key}` (blobs go in frames)")
        if key == "meta":
            codec, size, _b, doff, dlen = frame_map(w, True)
            if size <= INMEM_FRAME:
                # in memory: no temporary file (nor tempfile's imports)
                tmp: BinaryIO = io.BytesIO()
            else:
                import tempfile
                tmp = tempfile.TemporaryFile()
            with tmp:
                inflate(f, doff, dlen, codec, size, tmp.write)
                mw = Walker(tmp, 0, size)
                mn = mw.map_header()
                _read_meta_keys(mw, mn, idx, {"commits", "snapshots", "branch_heads"},
                                None, set())
                if not mw.at_end():
                    raise PackError("the meta frame holds bytes after its map")
            return
        # frames
        cnt = w.array_header()
        for _ in range(cnt):
            codec, size, blobs, doff, dlen = frame_map(w, False)
            fi = len(idx.frames)
            idx.frames.append((codec, size, doff, dlen, blobs))
            a = 0
            fresh = []
            for oid, ln in blobs:
                if oid not in idx.blobs:
                    idx.blobs[oid] = ("frame", fi, a, ln)
                    idx.blob_bytes += ln
                    fresh.append(oid)
                a += ln
            if verify or on_blob:
                fresh_set = set(fresh)

                def piece(oid: str, mv: memoryview, last: bool, _fs=fresh_set) -> None:
                    if oid in _fs:
                        on_blob(oid, mv, last)  # type: ignore[misc]
                        if last:
                            _fs.discard(oid)
                sp = _Splitter(blobs, verify, piece if on_blob else None)
                inflate(f, doff, dlen, codec, size, sp)
                sp.done()
            if progress:
                progress(doff + dlen - start)

    allowed = {"commits", "snapshots", "branch_heads"}
    _read_meta_keys(w, n, idx, allowed, v2_keys, seen)
    if not w.at_end():
        raise PackError(f"{end - w.pos} bytes after the pack's body map")
    if idx.version == 2:
        if "frames" not in seen:
            raise PackError("a v2 pack without `frames`")
        if "meta" in seen and seen & {"commits", "snapshots", "branch_heads"}:
            raise PackError("a v2 pack with both `meta` and plain commits/snapshots keys")
    idx.unpacked_bytes = unpacked[0]
    return idx


def check_blobs(f: BinaryIO, idx: PackIndex) -> None:
    """Hash every blob of a pack indexed with read_pack(verify=False)
    against its id (v2: every frame decompressed with its bounds).  The
    same checks as read_pack(verify=True), as a second pass that can run
    in a thread beside other work (hashing and decompression release the
    GIL).  Raises PackError."""
    if idx.version == 2:
        for codec, size, doff, dlen, blobs in idx.frames:
            sp = _Splitter(blobs, True, None)
            inflate(f, doff, dlen, codec, size, sp)
            sp.done()
        return
    spans = [(loc[1], loc[2], oid) for oid, loc in idx.blobs.items()]
    spans += [(off, n, oid) for oid, off, n in idx.dups]
    spans.sort()
    for off, length, oid in spans:
        h = hashlib.sha256()
        for b in _ranges(f, off, length, "a blob"):
            h.update(b)
        got = "sha256:" + h.hexdigest()
        if got != oid:
            raise PackError(f"blob {oid} content hashes to {got}")


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

class _HashFile:
    """A write-only file that hashes what goes through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.h, self.n = fh, hashlib.sha256(), 0

    def write(self, b: bytes | memoryview) -> int:
        self.fh.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


class PackWriter:
    """Streams one mpack to `path` (or a binary file object `fileobj`).

      w = PackWriter("out.mpack", version=2)
      w.add_commit(c); w.add_snapshot(s); w.branch_heads[b] = head
      w.add_blob(oid, data, path="src/x.c")          # bytes
      w.add_blob_from(oid, f, offset, length, path)  # bytes of another file
      info = w.close()  # {mpack_key, size_bytes, version, commits,
                        #  snapshots, blobs, blob_bytes, frames}

    Blob contents are spooled (to memory, then a temporary file past 16
    MiB) until close(), which orders them, cuts frames and writes the pack
    in one pass.  Ids are not re-hashed: callers add blobs whose id they
    computed or verified.  version 2: frames of about `frame_bytes`
    (zstd `level`, codec none when zstd does not help), blobs in path order
    (path = the first path a snapshot of this pack gives them, unless
    add_blob names one), a blob of `frame_bytes` or more in its own frame;
    commits and snapshots in one compressed `meta` frame (meta=False: the
    plain keys).  version 1/0: blobs in the order added."""

    def __init__(self, path: str | None = None, version: int = 2, *,
                 fileobj: BinaryIO | None = None, level: int = DEFAULT_LEVEL,
                 frame_bytes: int = DEFAULT_FRAME_BYTES, meta: bool = True,
                 tmpdir: str | None = None) -> None:
        if version not in (0, 1, 2):
            raise ValueError(f"unknown mpack version {version}")
        self.path, self.version, self.level = path, version, level
        self.frame_bytes, self.meta, self.tmpdir = frame_bytes, meta, tmpdir
        self._fileobj = fileobj
        self.commits: list[dict] = []
        self.snapshots: list[dict] = []
        self.branch_heads: dict[str, str] = {}
        import tempfile
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=tmpdir)
        self._spool_len = 0
        # oid -> [source, offset, length, path, seq]; source None = spool
        self._blobs: dict[str, list] = {}
        self._frame_copies: list[tuple] = []
        self._copied: dict[str, int] = {}

    def add_commit(self, c: dict) -> None:
        self.commits.append(c)

    def add_snapshot(self, s: dict) -> None:
        self.snapshots.append(s)

    def has_blob(self, oid: str) -> bool:
        return oid in self._blobs or oid in self._copied

    def add_frame_copy(self, f: BinaryIO, frame: tuple) -> None:
        """A v2 frame of another pack, copied verbatim (git's pack reuse):
        frame = (codec, size, data offset, data length, [(id, length)]) as
        in PackIndex.frames, its data in open file f.  Its blobs are not
        re-ordered, re-compressed nor re-hashed (they were verified where
        they came from)."""
        if self.version != 2:
            raise ValueError("frames are copied into v2 packs only")
        self._frame_copies.append((f, frame))
        for oid, n in frame[4]:
            self._copied[oid] = n

    def add_blob(self, oid: str, data: bytes | memoryview, path: str | None = None) -> None:
        if oid in self._blobs or oid in self._copied:
            return
        self._spool.seek(self._spool_len)
        self._spool.write(data)
        self._blobs[oid] = [None, self._spool_len, len(data), path, len(self._blobs)]
        self._spool_len += len(data)

    def add_blob_stream(self, oid: str, fill: Callable[[Callable[[Any], Any]], None],
                        path: str | None = None) -> None:
        """A blob whose content `fill(write)` produces by calling write(piece)."""
        if oid in self._blobs:
            return
        start = self._spool_len
        self._spool.seek(start)

        def write(p: Any) -> None:
            self._spool.write(p)
            self._spool_len += len(p)
        fill(write)
        self._blobs[oid] = [None, start, self._spool_len - start, path, len(self._blobs)]

    def add_blob_from(self, oid: str, f: BinaryIO, offset: int, length: int,
                      path: str | None = None) -> None:
        """A blob that is bytes [offset, offset+length) of open file f."""
        if oid not in self._blobs:
            self._blobs[oid] = [f, offset, length, path, len(self._blobs)]

    def close_discard(self) -> None:
        """Drop everything added; write nothing."""
        self._spool.close()

    @property
    def blob_count(self) -> int:
        return len(self._blobs) + len(self._copied)

    def blob_ids(self) -> list[str]:
        """Ids of every blob added (copied frames' included)."""
        return list(self._blobs) + list(self._copied)

    @property
    def blob_bytes(self) -> int:
        return sum(b[2] for b in self._blobs.values()) + sum(self._copied.values())

    # -- close ----------------------------------------------------------------

    def _pieces(self, rec: list) -> Iterator[bytes]:
        src = self._spool if rec[0] is None else rec[0]
        return _ranges(src, rec[1], rec[2], "a blob's source")

    def _ordered(self) -> list[tuple[str, list]]:
        paths: dict[str, str] = {}
        for s in self.snapshots:
            for p, o in (s.get("delta_upsert") or {}).items():
                if o in self._blobs and o not in paths:
                    paths[o] = p
        items = list(self._blobs.items())
        for oid, rec in items:
            if rec[3] is None:
                rec[3] = paths.get(oid)
        # all versions of a path together, oldest (first added) first;
        # blobs no snapshot names go last
        items.sort(key=lambda kv: (kv[1][3] is None, kv[1][3] or "", kv[1][4]))
        return items

    def close(self) -> dict:
        own = self._fileobj is None
        fh = open(self.path, "wb") if own else self._fileobj
        try:
            out = _HashFile(fh)
            if self.version == 2:
                nframes = self._write_v2(out)
            else:
                self._write_v1(out)
                nframes = 0
        finally:
            if own:
                fh.close()
            self._spool.close()
        return {"mpack_key": "sha256:" + out.h.hexdigest(), "size_bytes": out.n,
                "version": self.version, "commits": len(self.commits),
                "snapshots": len(self.snapshots), "blobs": self.blob_count,
                "blob_bytes": self.blob_bytes, "frames": nframes}

    def _write_v1(self, out: _HashFile) -> None:
        if self.version == 1:
            out.write(MPACK_MAGIC + b"\x01")
        keys = 3 + (1 if self.branch_heads else 0)
        out.write(_map_header(keys))
        out.write(_pack("commits") + _array_header(len(self.commits)))
        for c in self.commits:
            out.write(_pack(c))
        out.write(_pack("snapshots") + _array_header(len(self.snapshots)))
        for s in self.snapshots:
            out.write(_pack(s))
        if self.branch_heads:
            out.write(_pack("branch_heads") + _pack(self.branch_heads))
        out.write(_pack("blobs") + _array_header(len(self._blobs)))
        oid_key, content_key = _pack("object_id"), _pack("content")
        for oid, rec in self._blobs.items():
            out.write(b"\x82" + oid_key + _pack(oid) + content_key + _bin_header(rec[2]))
            for b in self._pieces(rec):
                out.write(b)

    def _frames_plan(self) -> list[list[tuple[str, list]]]:
        groups: list[list] = []
        cur: list = []
        cur_n = 0
        for oid, rec in self._ordered():
            n = rec[2]
            if n >= self.frame_bytes:
                groups.append([(oid, rec)])
                continue
            if cur and cur_n + n > self.frame_bytes:
                groups.append(cur)
                cur, cur_n = [], 0
            cur.append((oid, rec))
            cur_n += n
        if cur:
            groups.append(cur)
        return groups

    def _write_frame(self, out: _HashFile, raw: bytes | None, size: int,
                     blobs: list | None, pieces: Callable[[], Iterator[bytes]] | None = None) -> None:
        """One frame map.  raw: the decompressed bytes in memory; or
        pieces() for a large one-blob frame (compressed through a
        temporary file)."""
        z = _zstd()
        cctx = z.ZstdCompressor(level=self.level)
        head = {"codec": None, "size": size}
        if blobs is not None:
            head["blobs"] = blobs
        if raw is not None:
            comp = cctx.compress(raw)
            if len(comp) < len(raw):
                codec, data = "zstd", comp
            else:
                codec, data = "none", raw
            out.write(_map_header(len(head) + 1))
            out.write(_pack("codec") + _pack(codec) + _pack("size") + _pack(size))
            if blobs is not None:
                out.write(_pack("blobs") + _pack(blobs))
            out.write(_pack("data") + _bin_header(len(data)))
            out.write(data)
            return
        assert pieces is not None
        import tempfile
        with tempfile.TemporaryFile(dir=self.tmpdir) as tmp:
            with cctx.stream_writer(tmp, size=size, closefd=False) as zw:
                for p in pieces():
                    zw.write(p)
            clen = tmp.tell()
            codec = "zstd" if clen < size else "none"
            dlen = clen if codec == "zstd" else size
            out.write(_map_header(len(head) + 1))
            out.write(_pack("codec") + _pack(codec) + _pack("size") + _pack(size))
            if blobs is not None:
                out.write(_pack("blobs") + _pack(blobs))
            out.write(_pack("data") + _bin_header(dlen))
            if codec == "zstd":
                tmp.seek(0)
                while True:
                    b = tmp.read(CHUNK)
                    if not b:
                        break
                    out.write(b)
            else:
                for p in pieces():
                    out.write(p)

    def _write_v2(self, out: _HashFile) -> int:
        out.write(MPACK_MAGIC + b"\x02")
        groups = self._frames_plan()
        meta_body: dict[str, Any] = {"commits": self.commits, "snapshots": self.snapshots}
        if self.branch_heads:
            meta_body["branch_heads"] = self.branch_heads
        if self.meta:
            out.write(_map_header(2))
            raw = _pack(meta_body)
            out.write(_pack("meta"))
            if len(raw) <= FRAME_MAX:
                self._write_frame(out, raw, len(raw), None)
            else:
                def meta_pieces() -> Iterator[bytes]:
                    for i in range(0, len(raw), CHUNK):
                        yield raw[i:i + CHUNK]
                self._write_frame(out, None, len(raw), None, meta_pieces)
        else:
            out.write(_map_header(1 + len(meta_body)))
            for k, v in meta_body.items():
                out.write(_pack(k) + _pack(v))
        out.write(_pack("frames") + _array_header(len(groups) + len(self._frame_copies)))
        for src, (codec, size, doff, dlen, blobs) in self._frame_copies:
            out.write(_map_header(4) + _pack("codec") + _pack(codec) + _pack("size")
                      + _pack(size) + _pack("blobs") + _pack([list(b) for b in blobs])
                      + _pack("data") + _bin_header(dlen))
            for b in _ranges(src, doff, dlen, "a copied frame"):
                out.write(b)
        for g in groups:
            blobs = [[oid, rec[2]] for oid, rec in g]
            size = sum(rec[2] for _, rec in g)
            if len(g) == 1 and size >= self.frame_bytes:
                rec = g[0][1]
                self._write_frame(out, None, size, blobs, lambda r=rec: self._pieces(r))
            else:
                raw = b"".join(b for _, rec in g for b in self._pieces(rec))
                self._write_frame(out, raw, size, blobs)
        return len(groups) + len(self._frame_copies)


# ---------------------------------------------------------------------------
# In memory (small packs; the compatibility API of muselib)
# ---------------------------------------------------------------------------

def _blob_list(blobs: Any) -> list[dict]:
    """Accept a list of {object_id, content} maps or a dict id -> bytes."""
    if isinstance(blobs, collections.abc.Mapping):
        return [{"object_id": k, "content": bytes(v)} for k, v in blobs.items()]
    return list(blobs or [])


def build_mpack(commits: list[dict], snapshots: list[dict], blobs: Any,
                branch_heads: Mapping[str, str] | None = None,
                version: int = 1, blobs_key: str = "blobs", **v2opts: Any) -> bytes:
    """Serialise an mpack in memory.  version 1 = b"MUSE\\x01" + msgpack
    body, version 0 = body only (`blobs_key="objects"` writes the push-side
    synonym), version 2 = frames (PackWriter; v2opts: level, frame_bytes,
    meta)."""
    if version == 2:
        bio = io.BytesIO()
        w = PackWriter(version=2, fileobj=bio, **v2opts)
        for c in commits:
            w.add_commit(c)
        for s in snapshots:
            w.add_snapshot(s)
        if branch_heads:
            w.branch_heads.update(branch_heads)
        for b in _blob_list(blobs):
            w.add_blob(b["object_id"], b["content"])
        w.close()
        return bio.getvalue()
    body: dict[str, Any] = {
        "commits": list(commits),
        "snapshots": list(snapshots),
        blobs_key: _blob_list(blobs),
    }
    if branch_heads is not None:
        body["branch_heads"] = dict(branch_heads)
    packed = msgpack.packb(body, use_bin_type=True)
    if version == 1:
        return MPACK_MAGIC + b"\x01" + packed
    if version == 0:
        return packed
    raise ValueError(f"unknown mpack version {version}")


def parse_mpack(data: bytes) -> dict:
    """Parse v0, v1 or v2 bytes into {version, commits, snapshots, blobs,
    branch_heads} (blobs: list of {object_id, content}, contents checked
    against their ids for v2).  `objects` is folded into `blobs`.  Raises
    ValueError on anything that is not exactly one well-formed pack
    (trailing bytes included)."""
    data = bytes(data)
    if data[:5] == MPACK_MAGIC + b"\x02":
        bio = io.BytesIO(data)
        contents: dict[str, list] = {}
        idx = read_pack(bio, verify=True, on_blob=lambda oid, mv, last:
                        contents.setdefault(oid, []).append(bytes(mv)))
        return {"version": 2, "commits": idx.commits, "snapshots": idx.snapshots,
                "blobs": [{"object_id": oid, "content": b"".join(contents.get(oid, []))}
                          for oid in idx.blobs],
                "branch_heads": idx.branch_heads}
    if data[:4] == MPACK_MAGIC:
        if len(data) < 5 or data[4] != 1:
            raise ValueError(f"unsupported mpack version byte {data[4:5]!r}")
        version, body = 1, data[5:]
    else:
        version, body = 0, data
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"mpack body is not one msgpack value: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"mpack body is a {type(obj).__name__}, not a map")
    blobs = list(obj.get("blobs") or []) + list(obj.get("objects") or [])
    for b in blobs:
        if not isinstance(b, dict) or not isinstance(b.get("content"), bytes):
            raise ValueError("blob entry without bin content")
    return {
        "version": version,
        "commits": list(obj.get("commits") or []),
        "snapshots": list(obj.get("snapshots") or []),
        "blobs": blobs,
        "branch_heads": dict(obj.get("branch_heads") or {}),
    }
