"""Reading `torch.save` files without torch, refusing anything but tensors.

A restricted unpickler builds only tensors (as read-only NumPy arrays, memory-mapped), plain
containers and `argparse.Namespace`; every other global is refused, so a hostile file cannot
run code. Both formats are read: the zip format of torch >= 1.6 (`read_pt`) and the legacy
one (`read_state_dict` picks).
"""

import collections
import dataclasses
import io
import pickle
import struct
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..core.errors import RepaError


class UnsafeCheckpoint(RepaError, pickle.UnpicklingError):
    """A `.pt` file asks for something a checkpoint of tensors never needs."""


class UnreadableCheckpoint(RepaError, ValueError):
    """A file that is not a readable `torch.save` checkpoint (wrong format, truncated)."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: only the element type is needed."""

    dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *_):  # requires_grad, hooks, metadata
    size, stride = tuple(size), tuple(stride)
    fields = (offset, *size, *stride)
    if not isinstance(storage, np.ndarray) or len(size) != len(stride):
        raise UnsafeCheckpoint("malformed tensor record")
    if any(type(v) is not int or v < 0 for v in fields):
        raise UnsafeCheckpoint(f"malformed tensor record: offset {offset}, strides {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    # as_strided trusts its arguments: an out-of-range view would read foreign memory.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise UnsafeCheckpoint(f"tensor reaches element {last} of a {storage.size}-element storage")
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False)


def _rebuild_parameter(data, *_):  # requires_grad, hooks
    return data


def _latin1_bytes(text: str, encoding: str) -> bytes:
    # Pickle protocol 2 (torch.save's) writes `bytes` as `_codecs.encode(str, "latin1")`.
    if encoding != "latin1":
        raise UnsafeCheckpoint(f"unexpected bytes encoding {encoding!r}")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # A plain attribute bag: the reference's `args` carries only strings, numbers, booleans.
    ("argparse", "Namespace"): types.SimpleNamespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
} | {("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()}


def _data_offset(file, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header, whose extra field (torch pads it
    to align tensors) may differ from the central directory's."""
    file.seek(info.header_offset)
    header = file.read(30)
    if header[:4] != b"PK\x03\x04":
        raise UnreadableCheckpoint(f"corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[str, np.dtype], np.ndarray], path: str):
        super().__init__(io.BytesIO(data))
        self._storage = storage
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafeCheckpoint(
                f"{self._path}: refusing to load the global {module}.{name}: a checkpoint of "
                "tensors needs only torch storages, OrderedDict and argparse.Namespace, and "
                "this one could run code when unpickled."
            )
        return _SAFE_GLOBALS[module, name]

    def persistent_load(self, pid):
        match pid:
            case ("storage", _StorageType(dtype=dtype), str(key), _location, _numel):
                return self._storage(key, dtype)
        raise UnsafeCheckpoint(f"{self._path}: unknown persistent record {pid!r:.80}")


def read_pt(path: str | Path) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a read-only numpy array.

    Tensors are views into a memory map of the file, so nothing is read until used: loading the
    EMA weights of a training checkpoint does not read its optimizer state. Raises
    `UnsafeCheckpoint` if the pickle asks for anything but tensors, containers and
    `argparse.Namespace` (which becomes a `types.SimpleNamespace`).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(
            f"{path} is not a zip-format torch.save file (the legacy pre-1.6 format is not read)"
        )
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnreadableCheckpoint(
                f"{path} is a zip but not a torch.save file (no <name>/data.pkl)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        entries = {info.filename: info for info in archive.infolist()}
        big_endian = (
            prefix + "byteorder" in entries and archive.read(prefix + "byteorder") == b"big"
        )
        mapped = np.memmap(path, np.uint8, mode="r")
        storages: dict[str, np.ndarray] = {}

        def storage(key: str, dtype: np.dtype) -> np.ndarray:
            name = f"{prefix}data/{key}"
            if name not in entries:
                raise UnreadableCheckpoint(f"{path}: storage {key!r} is missing")
            if name not in storages:
                info = entries[name]
                if info.compress_type == zipfile.ZIP_STORED:
                    start = _data_offset(file, info)
                    raw = mapped[start : start + info.file_size]
                else:  # torch never compresses, but a re-zipped file may be.
                    raw = np.frombuffer(archive.read(name), np.uint8)
                storages[name] = raw
            raw = storages[name]
            if raw.size % dtype.itemsize:
                raise UnreadableCheckpoint(
                    f"{path}: storage {key!r} is not a whole number of {dtype}"
                )
            return raw.view(dtype.newbyteorder(">") if big_endian else dtype)

        return _Unpickler(archive.read(pickles[0]), storage, str(path)).load()


# torch's pre-1.6 `torch.save` format: three small pickles (magic number, protocol, system
# info), the object's pickle with storages as persistent records, the sorted list of
# storage keys, then each storage as a little-endian int64 element count and its bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _PlainUnpickler(pickle.Unpickler):
    """Only plain values: no globals, no persistent records."""

    def find_class(self, module: str, name: str):
        raise UnsafeCheckpoint(f"refusing to load the global {module}.{name}")


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
    """A tensor whose storage's bytes come after the pickle."""

    key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _record(key, offset, size, stride, *_) -> _TensorRecord:  # requires_grad, hooks
    return _TensorRecord(key, offset, tuple(size), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
    """`read_pt`'s allow-list, with tensors left as records until the storages are read."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _record
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafeCheckpoint(f"{self.path}: refusing to load the global {module}.{name}")
        return _SAFE_GLOBALS[module, name]

    def persistent_load(self, pid):
        match pid:
            case ("storage", _StorageType(dtype=dtype), str(key), _location, int(numel), None):
                self.storages[key] = (dtype, numel)
                return key
        raise UnsafeCheckpoint(f"{self.path}: unknown persistent record {pid!r:.80}")


def _read_legacy_pt(path: Path) -> dict[str, np.ndarray]:
    """A state dict saved by torch < 1.6 (or `_use_new_zipfile_serialization=False`)."""
    with open(path, "rb") as file:
        try:
            magic, protocol, info = (_PlainUnpickler(file).load() for _ in range(3))
        except (pickle.UnpicklingError, EOFError, ValueError):
            magic = protocol = info = None
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise UnreadableCheckpoint(f"{path} is neither a zip nor a legacy torch.save file")
        if not (isinstance(info, dict) and info.get("little_endian")):
            raise UnreadableCheckpoint(f"{path} was saved on a big-endian machine")
        unpickler = _LegacyUnpickler(file, path)
        state = unpickler.load()
        keys = _PlainUnpickler(file).load()
        start = file.tell()
    if not isinstance(state, dict) or not all(
        isinstance(v, _TensorRecord) and v.key in unpickler.storages for v in state.values()
    ):
        raise UnreadableCheckpoint(f"{path} does not hold a state dict of tensors")
    if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages):
        raise UnreadableCheckpoint(f"{path}: the storage list does not match the tensors")
    mapped = np.memmap(path, np.uint8, mode="r")
    storages = {}
    for key in keys:
        dtype, numel = unpickler.storages[key]
        end = start + 8 + numel * dtype.itemsize
        if end > mapped.size or int(mapped[start : start + 8].view("<i8")[0]) != numel:
            raise UnreadableCheckpoint(f"{path}: storage {key!r} is truncated or corrupt")
        storages[key] = mapped[start + 8 : end].view(dtype.newbyteorder("<"))
        start = end
    return {
        name: _rebuild_tensor(storages[r.key], r.offset, r.size, r.stride)
        for name, r in state.items()
    }


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from a `torch.save` file of either format."""
    path = Path(path)
    return read_pt(path) if zipfile.is_zipfile(path) else _read_legacy_pt(path)
