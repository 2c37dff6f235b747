"""Streaming safetensors: headers parsed and checked without torch, tensors memory-mapped
one at a time, output shards pre-laid-out so tensors can be written in any order.

The format: 8-byte little-endian header length, a JSON header mapping each tensor name to
``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data section), then
the data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import NamedTuple

from .errors import MixcliError

ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else 0)
# start address -> (length, weak reference to the map) of the input files mapped so far
_INPUT_MAPS: dict[int, tuple[int, weakref.ref]] = {}
_INPUT_MAPS_LOCK = threading.Lock()


def torch_dtype(code: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
            "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[code]


def dtype_code(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    codes = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
             "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
    return codes[name]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a header only."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: "SafetensorsFile"
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING


class SafetensorsFile:
    """One ``.safetensors`` file: header checked on open, tensors mapped on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._map: mmap.mmap | None = None
        self._opening = threading.Lock()
        self._read_header()

    def _bad(self, why: str) -> MixcliError:
        return MixcliError(f"{self.path}: not a valid safetensors file ({why}); "
                           "the file is corrupt or truncated: re-download or re-save it")

    def _read_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._bad(f"only {size} bytes")
                (length,) = struct.unpack("<Q", prefix)
                if length > min(MAX_HEADER, size - 8):
                    raise self._bad(f"header length {length} exceeds the file size {size}")
                raw = f.read(length)
        except OSError as error:
            raise MixcliError(f"{self.path}: cannot read ({error.strerror})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._bad(f"header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start = 8 + length
        data_size = size - data_start
        self.metadata = header.pop("__metadata__", None) or {}
        for name, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor '{name}' has a malformed entry") from None
            if code not in ITEM_SIZE:
                raise self._bad(f"tensor '{name}' has unknown dtype {code!r}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                    isinstance(begin, int) and isinstance(end, int)):
                raise self._bad(f"tensor '{name}' has a malformed shape or offsets")
            if end - begin != prod(shape) * ITEM_SIZE[code] or begin < 0:
                raise self._bad(f"tensor '{name}' offsets do not match its shape {list(shape)}")
            if end > data_size:
                raise self._bad(f"tensor '{name}' ends at byte {end} but the data section has "
                                f"{data_size} bytes")
            self.tensors[name] = TensorInfo(name, code, shape, self, data_start + begin, data_start + end)

    def load(self, info: TensorInfo):
        """The tensor as a memory-mapped view (no copy); do not modify it in place."""
        import torch

        if self._map is None:
            with self._opening:  # the engine's threads read tensors of one file at once: map it once
                if self._map is None:
                    with open(self.path, "rb") as f:
                        # a private copy-on-write map: writable for torch, never written back
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = torch_dtype(info.dtype)
        count = prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        self._populate(info)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.begin)
        address = flat.data_ptr() - info.begin
        known = _INPUT_MAPS.get(address)
        if known is None or known[1]() is not self._map:
            _register(address, self._map)
        return flat.view(dtype).view(info.shape)

    def _populate(self, info: TensorInfo) -> None:
        """Map a tensor's pages in one call (MADV_POPULATE_READ, Linux 5.14+) rather than one
        page fault per 64 KiB: a third of a merge's time went to faults otherwise."""
        if not _POPULATE_READ or not hasattr(self._map, "madvise"):
            return
        start = info.begin - info.begin % PAGE
        try:
            self._map.madvise(_POPULATE_READ, start, min(len(self._map), info.end) - start)
        except OSError:  # older kernels: fall back to page faults
            pass

    def release(self, info: TensorInfo) -> None:
        """Drop the pages of a tensor from this process's memory once it has been used."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        start = info.begin - info.begin % PAGE
        end = min(len(self._map), info.end)
        start_full = start if start == info.begin else start + PAGE  # keep a neighbour's page
        if end - start_full >= PAGE:
            self._map.madvise(mmap.MADV_DONTNEED, start_full, (end - start_full) // PAGE * PAGE)


def release_pages(tensor) -> None:
    """Let the pages of ``tensor`` go from this process's memory, if it is a view of an input
    file as :meth:`SafetensorsFile.load` maps it (what merge methods are given); otherwise do
    nothing. Values do not change: a page touched again is mapped back from the page cache
    (a minor fault, no disk read while the cache holds the file). For methods that pass over
    their inputs several times (iterations, one model after another): each pass then holds a
    few pages of the inputs instead of all of them. Inputs are never written, so no page
    holds a private copy that this would discard; only pages wholly inside ``tensor`` go."""
    if not _INPUT_MAPS or not tensor.is_contiguous() or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    with _INPUT_MAPS_LOCK:
        maps = list(_INPUT_MAPS.items())
    for address, (length, ref) in maps:
        # a live map is where it was registered (``tensor`` holds it open); a dead one is skipped
        mapped = ref()
        if mapped is not None and not mapped.closed and address <= start and end <= address + length:
            first = -(-(start - address) // PAGE) * PAGE
            last = (end - address) // PAGE * PAGE
            if last > first and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def _register(address: int, mapped: mmap.mmap) -> None:
    # no weak reference callback: one may run from any allocation, this lock held or not
    with _INPUT_MAPS_LOCK:
        for old in [a for a, (_, ref) in _INPUT_MAPS.items() if ref() is None]:
            del _INPUT_MAPS[old]
        _INPUT_MAPS[address] = (len(mapped), weakref.ref(mapped))


def parse_size(text: str | int, where: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count → bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise MixcliError(f"{where} must be positive, got {text}")
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if isinstance(text, str):
        stripped = text.strip().upper().replace(" ", "")
        number = stripped.rstrip("KMGTIB")
        unit = stripped[len(number):]
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if unit in units and value > 0:
            return int(value * units[unit])
    raise MixcliError(f"{where}: cannot read size {text!r}; write it like \"2GB\" or \"500MB\"")


def _reserve(fd: int, start: int, size: int) -> bool:
    """Size the shard and allocate its data blocks now; True when the blocks are allocated.

    Allocated blocks let tensors be written through a shared memory map: no write can then
    run out of space (which would be a SIGBUS, not an error), and both cores copy into the
    page cache at once, where ``pwrite`` calls on one file queue on its inode lock. Running
    out of space here raises ENOSPC; a file system that cannot allocate ahead falls back to
    a sparse file written with ``pwrite``.
    """
    os.ftruncate(fd, start + size)
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return False
    try:
        os.posix_fallocate(fd, start, size)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        return False
    return True


class _Slot(NamedTuple):
    """Where one output tensor goes: its shard, absolute byte offset and size, dtype, shape."""

    fd: int
    offset: int
    nbytes: int
    code: str
    shape: tuple[int, ...]


class ShardedWriter:
    """Writes a known list of tensors into sharded safetensors files.

    All shapes are known up front, so each shard's header and every tensor's offset are
    fixed before any data is written; tensors can then be written in any order, from any
    thread, straight to the file without buffering a shard in memory: computed tensors with
    ``os.pwrite`` (:meth:`write`), or computed in place in the file's own bytes
    (:meth:`destination`).
    """

    def __init__(self, folder: Path, tensors: list[tuple[str, str, tuple[int, ...]]], shard_size: int,
                 metadata: dict | None = None):
        self.folder = Path(folder)
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        used = 0
        for name, code, shape in tensors:
            nbytes = prod(shape) * ITEM_SIZE[code]
            if shards[-1] and used + nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, code, shape))
            used += nbytes
        count = len(shards)
        self.total_size = 0
        self.weight_map: dict[str, str] = {}
        self._where: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._mappable: set[int] = set()  # shards whose blocks are allocated
        self._extent: dict[int, tuple[int, int]] = {}  # fd -> (first, end) byte of its data
        self.files: list[Path] = []
        for index, members in enumerate(shards):
            filename = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name, code, shape in members:
                nbytes = prod(shape) * ITEM_SIZE[code]
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
            path = self.folder / filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # the user's umask applies
            self._fds.append(fd)
            self.files.append(path)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            data_start = 8 + len(raw)
            if _reserve(fd, data_start, offset):
                self._mappable.add(fd)
            self._extent[fd] = (data_start, data_start + offset)
            for name, code, shape in members:
                begin, end = header[name]["data_offsets"]
                self._where[name] = _Slot(fd, data_start + begin, end - begin, code, tuple(shape))
                self.weight_map[name] = filename
                self.total_size += end - begin

    def mapped(self, name: str) -> bool:
        """Whether :meth:`destination` hands out the file's own bytes for ``name``."""
        slot = self._where[name]
        return slot.nbytes > 0 and slot.fd in self._mappable

    @contextlib.contextmanager
    def destination(self, name: str):
        """A tensor of ``name``'s planned dtype and shape to fill in place; its bytes are in
        the output file once the block exits without an error.

        On a shard whose blocks are allocated this is a shared memory map of just this
        tensor's bytes, so the result is computed straight into the page cache with no copy.
        The map goes away with the last view of the tensor (its dirty pages stay in the page
        cache), so drop every reference after the block to keep resident memory at a few
        tensors. Elsewhere it is a temporary tensor, written with ``pwrite`` on exit.
        """
        import torch

        fd, offset, nbytes, code, shape = self._where[name]
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        window = None
        if self.mapped(name):
            try:
                window = mmap.mmap(fd, offset + nbytes - start, offset=start)
            except OSError:  # a file system without shared writable maps
                self._mappable.discard(fd)
        if window is None:
            staging = torch.empty(shape, dtype=torch_dtype(code))
            yield staging
            self._pwrite(fd, offset, staging)
            return
        raw = torch.frombuffer(window, dtype=torch.uint8, count=nbytes, offset=offset - start)
        del window  # the tensor holds the map now: it is unmapped when its last view is freed
        target = raw.view(torch_dtype(code)).view(shape)
        del raw
        yield target

    def write(self, name: str, tensor) -> None:
        """Write a computed tensor (any device; it must have the planned size in bytes)."""
        fd, offset, nbytes, _, _ = self._where[name]
        data = tensor.detach().to("cpu").contiguous()
        if data.numel() * data.element_size() != nbytes:
            raise RuntimeError(f"tensor '{name}' has {data.numel() * data.element_size()} bytes, "
                               f"{nbytes} were planned")
        # pwrite, not a map: mapping the bytes too would hold the tensor in memory twice
        self._pwrite(fd, offset, data)

    @staticmethod
    def _pwrite(fd: int, offset: int, tensor) -> None:
        import torch

        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def warm(self, limit: int, stopping) -> None:
        """Bring up to ``limit`` bytes of the allocated shards into the page cache, in file
        order, until ``stopping`` (a threading.Event) is set, by reading them: blocks that
        are allocated but not yet written read as zeros without disk I/O, and the pages they
        leave in the cache are then written into without faulting fresh memory in."""
        buffer = bytearray(2**20)
        for fd in self._fds:
            if fd not in self._mappable:
                continue
            begin, end = self._extent[fd]
            for step, offset in enumerate(range(begin, min(end, begin + limit), len(buffer))):
                if step % 64 == 0 and stopping.is_set():
                    return
                try:
                    os.preadv(fd, [buffer], offset)
                except OSError:
                    return
            limit -= end - begin
            if limit <= 0:
                return

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
