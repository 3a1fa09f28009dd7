"""Reading the project's torch checkpoints without importing torch.

`import torch` alone costs a one-shot text query 2-4 s on a small CPU, more than the whole query
may take; the text tower's forward pass needs only numpy (encoders/model/text_numpy.py). This
reads the file `torch.save` writes (torch >= 1.6, zip format) into the same nested dict
`torch.load(path, weights_only=True)` gives, with numpy arrays in place of tensors.

The format, as torch 2.x writes it: a zip archive, members stored uncompressed under one folder
`<prefix>/`: `data.pkl` (the object, pickle protocol 2), `data/<key>` (each storage's raw bytes,
little-endian, aligned to 64 bytes), `byteorder` ("little"), `version`, `.format_version`,
`.storage_alignment`, `.data/serialization_id`. In data.pkl a tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` whose
storage is a persistent id ('storage', torch.<Type>Storage, key, location, numel); a state_dict
is an OrderedDict with a `_metadata` attribute (BUILD); an nn.Parameter saved alone is
`_rebuild_parameter(tensor, requires_grad, hooks)`.

Safety: the unpickler resolves only the globals listed in `_GLOBALS` (what a weights-only
checkpoint needs) and refuses any other, so a crafted data.pkl cannot run code. Tensor views are
checked against their storage's bounds before numpy builds them.

Laziness: the file is memory-mapped once; a tensor is a read-only view of the mapped bytes, so a
training checkpoint's optimizer state (larger than the model) is never read from disk unless
used. Copy an array (`np.array(a)`) to write to it or to let the mapping go.
bfloat16 storages (numpy has no such type) are widened to float32, exactly.
"""
from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from core.atomic import sha256_file
from core.commands import cli_command
from core.errors import PcmeError

BFLOAT16 = "bfloat16"  # marker: stored as uint16, widened to float32 when a tensor is built

# torch.<Name>Storage -> numpy dtype of its elements (little-endian in the file)
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}


class _StorageType:
    """What `torch.<Name>Storage` resolves to: only its element type is needed."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """One storage: its elements as a flat (read-only) array, over the mapped file."""

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array, self.bfloat16 = array, bfloat16


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a view of `storage` (requires_grad, hooks and metadata
    mean nothing to an array)."""
    if not isinstance(storage, _Storage):
        raise ValueError("tensor without a storage")
    offset, size, stride = int(storage_offset), tuple(map(int, size)), tuple(map(int, stride))
    flat = storage.array
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise ValueError("malformed tensor view")
    # the view's last element must lie inside the storage (as_strided does not check)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and last >= flat.size:
        raise ValueError("tensor view outside its storage")
    if 0 in size:
        out = np.zeros(size, dtype=flat.dtype)
        out.flags.writeable = False
    else:
        out = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
            writeable=False)
    if storage.bfloat16:  # the high half of a float32: widening is exact
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
    return data


def _device(kind, index=None):
    """torch.device: kept as its name ("cpu", "cuda:0")."""
    return str(kind) if index is None else f"{kind}:{int(index)}"


def _latin1(text, encoding="latin1"):
    """_codecs.encode, how protocol 2 pickles bytes; nothing but latin-1 text to bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode is only read for latin-1 bytes")
    return text.encode("latin1")


# (module, name) -> object: everything a weights-only checkpoint may name, nothing else.
# Protocol 2 spells builtins as __builtin__.
_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _latin1,
    **{(m, n): obj for m in ("builtins", "__builtin__")
       for n, obj in (("set", set), ("frozenset", frozenset), ("complex", complex))},
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, storages):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module, name):
        obj = _GLOBALS.get((module, name))
        if obj is None:
            what = ("storage type" if module == "torch" and name.endswith("Storage")
                    else "global")
            raise PcmeError(f"checkpoint {self.path}: refused: data.pkl names {what} "
                            f"{module}.{name}, which a weights-only checkpoint does not hold")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError("unknown persistent id")
        return self.storages(pid[1], str(pid[2]), int(pid[4]))


def check_recorded_sha256(path: str | Path, expected: str | None) -> None:
    """A checkpoint that changed since an index recorded its sha256 is refused (its vectors
    would no longer match the index's)."""
    if expected and Path(path).is_file() and sha256_file(path) != expected:
        raise PcmeError(f"checkpoint {path}: sha256 differs from the one recorded in the index "
                        "manifest (the model changed since indexing; re-encode and re-index)")


def missing_hint(path: Path) -> str:
    """A typo is told which checkpoints exist beside it; no checkpoint at all, how to make one."""
    if path.is_dir():
        return "is a directory, not a checkpoint file"
    found = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
    if found:
        return f"file not found; {path.parent} has {', '.join(found)}"
    return f"file not found; train first, run: {cli_command('train')}"


def _data_pickle(zf: zipfile.ZipFile) -> str:
    """The prefix (archive folder) of the one `<prefix>/data.pkl` member."""
    found = [n[: -len("/data.pkl")] for n in zf.namelist()
             if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise ValueError("no data.pkl")
    return found[0]


def _member_bytes(zf: zipfile.ZipFile, mm: mmap.mmap, name: str) -> memoryview | bytes:
    """A member's bytes: a slice of the mapped file when stored (what torch writes), else read."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return zf.read(name)
    # the data follows the local header, whose extra field (torch's alignment padding) may
    # differ from the central directory's
    head = info.header_offset
    if mm[head: head + 4] != b"PK\x03\x04":
        raise ValueError("bad local header")
    name_len, extra_len = struct.unpack("<HH", mm[head + 26: head + 30])
    start = head + 30 + name_len + extra_len
    if start + info.file_size > len(mm):
        raise EOFError("member runs past the end of the file")
    return memoryview(mm)[start: start + info.file_size]


def read_checkpoint_numpy(path: str | Path) -> dict:
    """The dict `torch.load(path, weights_only=True)` gives, tensors as read-only numpy arrays
    (views of the memory-mapped file; bfloat16 widened to float32). Any torch zip checkpoint
    whose object is a dict; PcmeError (one line, naming the path) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"checkpoint {path}: {missing_hint(path)}")
    try:
        with open(path, "rb") as f:
            try:
                zf = zipfile.ZipFile(f)
            except zipfile.BadZipFile:
                raise PcmeError(f"checkpoint {path}: not a torch checkpoint (not a zip archive; "
                                f"truncated, or saved in another format)") from None
            with zf:
                prefix = _data_pickle(zf)
                names = set(zf.namelist())
                order = (zf.read(f"{prefix}/byteorder").decode().strip()
                         if f"{prefix}/byteorder" in names else "little")
                if order not in ("little", "big"):
                    raise ValueError(f"byteorder {order!r}")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                cache: dict[str, _Storage] = {}

                def storage(kind: _StorageType, key: str, numel: int) -> _Storage:
                    if key not in cache:
                        bf16 = kind.dtype is BFLOAT16
                        dtype = np.dtype("<u2") if bf16 else kind.dtype
                        if order == "big":
                            dtype = dtype.newbyteorder(">")
                        raw = _member_bytes(zf, mm, f"{prefix}/data/{key}")
                        if len(raw) < numel * dtype.itemsize:
                            raise EOFError(f"storage {key} is short")
                        flat = np.frombuffer(raw, dtype=dtype, count=numel)
                        if order == "big":  # rare: one copy in native order
                            flat = flat.astype(dtype.newbyteorder("="))
                            flat.flags.writeable = False
                        cache[key] = _Storage(flat, bf16)
                    return cache[key]

                pkl = io.BytesIO(zf.read(f"{prefix}/data.pkl"))  # small; its CRC is checked
                obj = _Unpickler(pkl, path, storage).load()
    except PcmeError:
        raise
    except Exception as e:  # truncated, corrupt or foreign archives all end here
        raise PcmeError(f"checkpoint {path}: cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if not isinstance(obj, dict):
        raise PcmeError(f"checkpoint {path}: holds a {type(obj).__name__}, not a dict")
    return obj
