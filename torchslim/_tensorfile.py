"""One tensor file: safetensors layout, written from the tensors' own memory, checksummed per chunk.

The layout is safetensors' (an 8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then the raw bytes), so
``safetensors.safe_open`` and ``load_file`` read these files. The header is
padded so that the data starts 64-byte aligned, and tensors are laid out widest
element first, so every tensor lies at an offset aligned to its element size.

**Writing** (:func:`write`) sends each tensor's bytes to the file straight from
its storage (small ones through a 1 MiB buffer): no serialized copy of the
whole file is made, so a save needs no memory beyond the state (a CUDA or
non-contiguous tensor is copied to the host one tensor at a time). The bytes
are checksummed as they are written, with xxh3-64 over each 64 MiB chunk of the
file, in a second thread while the first writes. xxh3 runs at several GB/s (a
SHA-256 at ~0.6 GB/s was the bottleneck of saving); one checksum per chunk,
rather than one per file or per tensor, lets a load verify the chunks in
parallel threads and bounds the work per checksum whatever the tensor sizes.

**Reading** (:class:`TensorFile`) trusts nothing in the file: it opens it
without following a symbolic link, checks its size against the one recorded
at write time, bounds the header by the file's size before reading it, checks
that every tensor's byte range lies inside the data, matches its dtype and
shape, and overlaps no other, and verifies the checksums, before any tensor is
handed out. Tensors are views on a private (copy-on-write) memory map of the
file: copied where they belong, or kept as they are, as ``safetensors.torch.load_file``
does (no intermediate copy of the file). Each refusal is a
:class:`BadFile` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash

__all__ = ["CHUNK_BYTES", "CHECKSUM", "BadFile", "TensorFile", "nonfinite", "write"]

CHECKSUM = "xxh3_64"
CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_ALIGN = 64
_SMALL = 64 << 10  # tensors below this go through the write buffer
_BUFFER = 1 << 20

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
_BY_CODE = {code: dtype for dtype, code in DTYPES.items()}


class BadFile(ValueError):
    """A tensor file that is not what its checkpoint says it is; the message is the reason."""


# ---------------------------------------------------------------- writing


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding NaN or Inf.

    One ``aminmax`` reduction per tensor (NaN propagates into it, Inf is its own
    extreme): no boolean tensor the size of the state is made, as ``isfinite``
    would.
    """
    bad = []
    for key, t in tensors.items():
        if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.is_complex() or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            finite = bool(torch.isfinite(t).all())
        else:
            lo, hi = torch.aminmax(t)
            finite = math.isfinite(float(lo)) and math.isfinite(float(hi))  # a host sync, once per tensor
        if not finite:
            bad.append(key)
    return bad


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The padded header (length prefix included) and ``(key, begin, end)`` in file order, offsets in the file."""
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: widest elements first
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    spans, offset = [], 0
    for key in order:
        t = tensors[key]
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot checkpoint {key}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        entries[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        spans.append((key, offset, offset + size))
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % _ALIGN)
    start = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, [(k, b + start, e + start) for k, b, e in spans]


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order: its own memory when it is a contiguous host tensor."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu", memory_format=torch.contiguous_format)
    array: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


class _ChunkHasher:
    """xxh3-64 of each ``chunk_bytes`` of a stream fed in order."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes, self._filled = chunk_bytes, 0
        self.digests: list[str] = []
        self._h = xxhash.xxh3_64()

    def update(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), self.chunk_bytes - self._filled)
            self._h.update(data[:n])
            self._filled, data = self._filled + n, data[n:]
            if self._filled == self.chunk_bytes:
                self.digests.append(self._h.hexdigest())
                self._h.reset()
                self._filled = 0

    def finish(self) -> list[str]:
        if self._filled or not self.digests:
            self.digests.append(self._h.hexdigest())
        return self.digests


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]


def write(path: str, tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Write ``tensors`` to a new file at ``path`` and fsync it; return its entry for ``state.json``.

    The entry: ``{"bytes": size, "checksum": "xxh3_64", "chunk_bytes": ..., "chunks": [hex digest, ...]}``.
    """
    header, spans = _layout(tensors)
    hasher = _ChunkHasher(chunk_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    # Hashing runs in a second thread, in order, while this one writes (both release the GIL).
    with ThreadPoolExecutor(1, thread_name_prefix="torchslim-checksum") as hashing:
        try:
            hashed, buffer = [], bytearray()
            for piece in _pieces(header, spans, tensors):
                hashed.append(hashing.submit(hasher.update, piece))
                if len(piece) < _SMALL:
                    buffer += piece
                    if len(buffer) < _BUFFER:
                        continue
                    piece, buffer = memoryview(buffer), bytearray()
                elif buffer:
                    _write_all(fd, memoryview(buffer))
                    buffer = bytearray()
                _write_all(fd, piece)
            _write_all(fd, memoryview(buffer))
            os.fsync(fd)
        finally:
            os.close(fd)
        for done in hashed:
            done.result()
    size = spans[-1][2] if spans else len(header)
    return {"bytes": size, "checksum": CHECKSUM, "chunk_bytes": chunk_bytes, "chunks": hasher.finish()}


def _pieces(header: bytes, spans: list[tuple[str, int, int]], tensors: Mapping[str, torch.Tensor]) -> Iterable[memoryview]:
    yield memoryview(header)
    for key, begin, end in spans:
        if end > begin:
            yield _host_bytes(tensors[key])


# ---------------------------------------------------------------- reading


class TensorFile:
    """A tensor file opened for reading, checked against its ``state.json`` entry (see the module docstring).

    Args:
        path: the file.
        expected: its entry in ``state.json``: ``bytes`` and either the chunked
            xxh3 checksums (format 2) or ``sha256`` (format 1).
    """

    def __init__(self, path: str, expected: Any) -> None:
        if not isinstance(expected, dict) or not _is_int(expected.get("bytes")):
            raise BadFile(f"has an entry in state.json that is not {{'bytes': <int>, ...}}: {expected!r:.200}")
        self.path, self.expected, self._viewed = path, expected, False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BadFile("is missing") from None
        except OSError as e:
            if os.path.islink(path):
                raise BadFile(f"is a symbolic link (to {os.readlink(path)!r}), not a file of the checkpoint") from None
            raise BadFile(f"cannot be opened: {e}") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadFile("is not a regular file")
            self.size = info.st_size
            if self.size != expected["bytes"]:
                raise BadFile(f"has {self.size} bytes, but {expected['bytes']} were written (truncated or overwritten)")
            self.entries = self._read_header(fd)
            # A private (copy-on-write) map: views handed out may be written by their new owner (an optimizer's
            # state), which copies just the pages written and never changes the file.
            self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)

    def _read_header(self, fd: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
        if self.size < 8:
            raise BadFile(f"has {self.size} bytes, too few for a header")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > min(self.size - 8, MAX_HEADER_BYTES):
            raise BadFile(f"has a header length of {n} bytes, more than the {self.size - 8} bytes after it")
        try:
            header = json.loads(os.pread(fd, n, 8))
        except (ValueError, RecursionError) as e:
            raise BadFile(f"has a header that is not valid JSON ({str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise BadFile("has a header that is not a JSON object")
        entries = {}
        data_start, data_size = 8 + n, self.size - 8 - n
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype, shape, begin, end = _check_entry(key, entry, data_size)
            entries[key] = (dtype, shape, data_start + begin, data_start + end)
        spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
        for (_, end0, k0), (begin1, _, k1) in zip(spans, spans[1:]):
            if begin1 < end0:
                raise BadFile(f"has tensors {k0!r} and {k1!r} whose bytes overlap")
        return entries

    # ------------------------------------------------------------ checksums

    @property
    def checksum_kind(self) -> str:
        return "sha256" if "sha256" in self.expected else str(self.expected.get("checksum"))

    def verify(self) -> None:
        """Check the recorded checksums against the file's bytes (chunks in parallel threads)."""
        if self.checksum_kind == "sha256":  # format 1: one SHA-256 of the whole file
            if hashlib.sha256(memoryview(self._map)).hexdigest() != self.expected["sha256"]:
                raise BadFile("does not match the SHA-256 recorded when it was written")
            return
        if self.checksum_kind != CHECKSUM:
            raise BadFile(f"has an unknown checksum kind {self.checksum_kind!r} (this release reads {CHECKSUM!r}, sha256)")
        chunk: Any = self.expected.get("chunk_bytes")
        chunks = self.expected.get("chunks")
        if not _is_int(chunk) or chunk <= 0 or not isinstance(chunks, list):
            raise BadFile("has an entry in state.json that lacks a positive chunk_bytes and a list of chunks")
        if len(chunks) != max(1, -(-self.size // chunk)):
            raise BadFile(f"has {len(chunks)} chunk checksums recorded for {self.size} bytes in chunks of {chunk}")
        view = memoryview(self._map)
        try:
            def digest(i: int) -> str:
                return xxhash.xxh3_64_hexdigest(view[i * chunk:(i + 1) * chunk])

            workers = max(1, min(len(chunks), os.cpu_count() or 1, 8))
            with ThreadPoolExecutor(workers, thread_name_prefix="torchslim-verify") as pool:
                bad = [i for i, d in enumerate(pool.map(digest, range(len(chunks)))) if d != chunks[i]]
        finally:
            view.release()
        if bad:
            raise BadFile(f"has bytes {bad[0] * chunk}-{min(self.size, (bad[0] + 1) * chunk)} (chunk {bad[0]} of "
                          f"{len(chunks)}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) do not match their "
                          "checksum")

    # ------------------------------------------------------------ tensors

    def view(self, key: str) -> torch.Tensor:
        """A tensor viewing the file's bytes for ``key``, copy-on-write: no byte is copied until it is written."""
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._viewed = True
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // itemsize, offset=begin)
        return flat.view(shape)

    def close(self) -> None:
        """Unmap the file now if no view was handed out; otherwise the map goes with the last view.

        (A tensor from ``torch.frombuffer`` keeps the map object alive but does not stop
        ``mmap.close()`` from unmapping the memory under it.)
        """
        if not self._viewed:
            self._map.close()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(key: str, entry: Any, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise BadFile(f"has tensor {key!r} whose header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _BY_CODE:
        raise BadFile(f"has tensor {key!r} of unknown dtype {dtype!r:.40}")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadFile(f"has tensor {key!r} whose shape {shape!r:.80} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise BadFile(f"has tensor {key!r} whose data_offsets {offsets!r:.80} are not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise BadFile(f"has tensor {key!r} at bytes {begin}-{end}, outside the {data_size} bytes of data")
    expected = math.prod(shape) * torch.empty((), dtype=_BY_CODE[dtype]).element_size()
    if end - begin != expected:
        raise BadFile(f"has tensor {key!r}, {dtype} of shape {shape}, which needs {expected} bytes, but {end - begin} are given")
    return _BY_CODE[dtype], shape, begin, end
