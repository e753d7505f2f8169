"""Weight files read without running anything in them: PyTorch (zip or legacy), safetensors and numpy .npz.

The reader is chosen by the file's first bytes, never by its name. A pickle (inside a PyTorch file) is first
scanned with pickletools, which executes nothing: every global it names must be on an exact allow-list
(`ALLOWED_GLOBALS`: tensor rebuilders, storage types, two containers and the module classes of a pickled
PMG or PMG-V2) and it may use only the opcodes of torch's weights-only unpickler. Then it is unpickled without any
import: the zip format by `torch.load(weights_only=True)`, the legacy (pre-1.6) format by `_LegacyUnpickler`,
which looks every global up in the same table (torch's weights-only unpickler refuses the class references
of a legacy whole pickled model). The classes of a whole pickled model become inert stand-ins that keep
their pickled attributes, from which the state dict is read. `.npz` is read with `allow_pickle=False`.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import struct
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, NamedTuple

import numpy as np

from pmg_jax.errors import PMGError

ZIP_MAGIC = b"PK\x03\x04"
# Keys under which training scripts commonly nest the weights in a saved dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# The classes of a whole pickled model that come back as stand-ins: the reference PMG's (its model.py and
# Resnet.py), the official PMG-V2's (its model.py and Resnet_CCBC.py), torchvision's ResNet, and the torch.nn
# layers they are built from.
MODULE_CLASSES = (
    "model.PMG",
    "model.PMG_V2",
    "model.BasicConv",
    "Resnet.ResNet",
    "Resnet.Bottleneck",
    "Resnet.BasicBlock",
    "Resnet_CCBC.ResNet",
    "Resnet_CCBC.Bottleneck",
    "Resnet_CCBC.BasicBlock",
    "torchvision.models.resnet.ResNet",
    "torchvision.models.resnet.Bottleneck",
    "torchvision.models.resnet.BasicBlock",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm1d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.ELU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AdaptiveMaxPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.dropout.Dropout",
)
# torch.save's storage classes (one per dtype) by the dtype name they hold.
STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_TENSOR_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2")
_PARAMETER_REBUILDERS = ("_rebuild_parameter", "_rebuild_parameter_with_state")
# Every global a weight file may name (torch.save writes these for tensors, parameters and modules).
ALLOWED_GLOBALS = frozenset(
    {"collections.OrderedDict", "builtins.set", "__builtin__.set"}
    | {f"torch._utils.{f}" for f in _TENSOR_REBUILDERS + _PARAMETER_REBUILDERS}
    | {f"torch.{s}" for s in STORAGE_DTYPES}
    | set(MODULE_CLASSES)
)
# The opcodes torch's weights-only unpickler executes (torch/_weights_only_unpickler.py); torch.save uses no others.
ALLOWED_OPCODES = frozenset(
    "PROTO STOP GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 "  # noqa: SIM905
    "NONE NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 LONG1 BINFLOAT "
    "BINUNICODE SHORT_BINSTRING BINPERSID BINGET LONG_BINGET BINPUT LONG_BINPUT".split()
)
_STRING_OPCODES = frozenset(
    {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_LEGACY_PICKLES = 5  # magic number, format version, system info, the object, its storage keys


class WeightFileError(PMGError, ValueError):
    """A weight file that cannot, or must not, be read; the message is one line naming the file."""


class StandIn:
    """An inert stand-in for a class of a pickled model: it keeps the pickled attributes and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        """Whatever the pickle passes is ignored."""
        obj = super().__new__(cls)
        obj.pickled = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        """Keep the pickled attribute dict (`_parameters`, `_buffers`, `_modules`, ...) as data."""
        self.pickled = state if isinstance(state, dict) else {}


@functools.cache
def stand_in(qualified: str) -> type[StandIn]:
    """The stand-in class for `module.Name` (one per name, so that a model's types stay tellable apart)."""
    module, _, name = qualified.rpartition(".")
    return type(name, (StandIn,), {"__module__": module, "__qualname__": name})


# ----------------------------------------------------------------------------- choosing the reader


def read(path: str) -> dict[str, np.ndarray]:
    """The named arrays in a weight file (names as stored), read by what the file holds, whatever its name."""
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(ZIP_MAGIC):
        return _read_zip(path, head)
    if head[:1] == b"\x80":  # a pickle's PROTO opcode: torch's legacy format
        return _read_legacy(path)
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return _read_safetensors(path)
    raise WeightFileError(
        f"{path}: not a weight file: neither a PyTorch file, a safetensors file nor a numpy .npz "
        "(files are read by what they hold, whatever their name)"
    )


def unreadable(path: str, kind: str, error: Exception) -> WeightFileError:
    """One line naming the file and the reader's first sentence (truncated files give long reports)."""
    reason = (str(error).splitlines() or [""])[0].split(". ")[0]
    return WeightFileError(
        f"{path}: cannot read it as a {kind} file (truncated or corrupt?): {type(error).__name__}: {reason}"
    )


def _read_zip(path: str, head: bytes) -> dict[str, np.ndarray]:
    """An .npz (only .npy members) or torch's zip format (one `<archive>/data.pkl`); any other zip is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        first = head[30 : 30 + int.from_bytes(head[26:28], "little")]  # the first member's name, from its header
        raise unreadable(path, "numpy .npz" if first.endswith(b".npy") else "PyTorch", e) from e
    names = [m.filename for m in members]
    if names and all(n.endswith(".npy") for n in names):
        return _read_npz(path)
    pickles = [m for m in members if m.filename.endswith("/data.pkl") and m.filename.count("/") == 1]
    if len(pickles) == 1:
        return _read_torch_zip(path, pickles[0])
    raise WeightFileError(
        f"{path}: a zip archive that is neither a PyTorch file nor a numpy .npz (members: {', '.join(names[:4])})"
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
        raise unreadable(path, "safetensors", e) from e


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise unreadable(path, "numpy .npz", e) from e


# ----------------------------------------------------------------------------- checking pickles


def pickle_globals(stream: IO[bytes]) -> tuple[list[str], set[str]]:
    """(the globals one pickle names, in order; the opcodes it uses), read with pickletools, which runs nothing.

    A protocol-4 STACK_GLOBAL takes its names from the stack: the strings pushed (or fetched from the memo)
    just before it are taken as its module and name.
    """
    found: list[str] = []
    opcodes: set[str] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        opcodes.add(name)
        if name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", ".", 1))
        elif name == "STACK_GLOBAL":
            found.append(".".join(str(s) for s in pushed[-2:]))
        if name in _STRING_OPCODES:
            pushed.append(arg)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name != "FRAME":
            pushed.append(None)
    return found, opcodes


def check_pickle(stream: IO[bytes], path: str) -> None:
    """Refuse, in one line, a pickle naming a global off the allow-list or using an opcode torch.save never writes."""
    start = stream.tell()
    try:
        found, opcodes = pickle_globals(stream)
    except (ValueError, EOFError, UnicodeDecodeError) as e:  # pickletools' words for a malformed pickle
        raise unreadable(path, "PyTorch", e) from e
    finally:
        stream.seek(start)
    for name in found:
        if name not in ALLOWED_GLOBALS:
            raise WeightFileError(
                f"{path}: refuses to load: it calls {name}, which no model file needs (only tensors, plain "
                "containers and the layers of a pickled PMG or PMG-V2 are read; see docs/convert.md)"
            )
    if extra := sorted(opcodes - ALLOWED_OPCODES):
        raise WeightFileError(
            f"{path}: refuses to load: it uses the pickle opcode {extra[0]}, which torch.save never writes"
        )


# ----------------------------------------------------------------------------- PyTorch files


def _import_torch(path: str) -> types.ModuleType:
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(
            f"{path}: reading PyTorch files needs torch (pip install torch); "
            ".safetensors and .npz files are read without it"
        ) from e
    return torch


def _read_torch_zip(path: str, data_pkl: zipfile.ZipInfo) -> dict[str, np.ndarray]:
    """torch's zip format: the pickle checked, then torch.load(weights_only=True) with the stand-ins allowed."""
    if data_pkl.compress_type != zipfile.ZIP_STORED:  # torch.save stores; a compressed one could be a zip bomb
        raise WeightFileError(f"{path}: refuses to load: its {data_pkl.filename} is compressed, which torch never does")
    with zipfile.ZipFile(path) as archive:
        check_pickle(io.BytesIO(archive.read(data_pkl)), path)
    torch = _import_torch(path)
    allowed = [(stand_in(name), name) for name in MODULE_CLASSES]
    try:
        # An open file, not the path: torch.load would hand a path ending in .safetensors to another reader.
        with open(path, "rb") as f, torch.serialization.safe_globals(allowed):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, AttributeError, TypeError, pickle.UnpicklingError) as e:
        raise unreadable(path, "PyTorch", e) from e
    return _arrays(obj, path, torch)


class _Storage(NamedTuple):
    """A storage of the legacy format: its bytes (filled after the object is unpickled) and their dtype."""

    data: Any  # a uint8 torch.Tensor
    dtype: Any


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> Any:
    """The tensor viewing `storage` (requires_grad, hooks and metadata are not kept: nothing here needs them)."""
    flat = storage.data.view(storage.dtype)
    return flat.as_strided(size, stride, flat.storage_offset() + offset)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """A parameter's tensor (requires_grad, hooks and Python attributes are not kept)."""
    return data


def _legacy_table(torch: types.ModuleType) -> dict[str, Any]:
    """What each allowed global is when a legacy pickle names it: plain containers, our rebuilders, dtypes."""
    table: dict[str, Any] = {"collections.OrderedDict": OrderedDict, "builtins.set": set, "__builtin__.set": set}
    table |= {f"torch._utils.{f}": _rebuild_tensor for f in _TENSOR_REBUILDERS}
    table |= {f"torch._utils.{f}": _rebuild_parameter for f in _PARAMETER_REBUILDERS}
    table |= {f"torch.{s}": getattr(torch, dtype) for s, dtype in STORAGE_DTYPES.items()}
    table |= {name: stand_in(name) for name in MODULE_CLASSES}
    assert table.keys() == ALLOWED_GLOBALS
    return table


def _is_stand_in(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, StandIn)


class _LegacyUnpickler(pickle.Unpickler):
    """Python's unpickler with every import replaced by a look-up of the exact name in the legacy table."""

    def __init__(self, file: IO[bytes], table: Mapping[str, Any], storages: dict[str, _Storage], limit: int):
        super().__init__(file, encoding="utf-8")
        self.table, self.storages, self.limit = table, storages, limit

    def find_class(self, module: str, name: str) -> Any:
        """The table's entry for `module.name`; nothing is imported."""
        try:
            return self.table[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        """A stand-in class (torch's legacy format names a model's classes so) or a storage, empty until filled."""
        import torch

        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and _is_stand_in(pid[1]):
            return pid[1]
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[4], int)
            and pid[5] is None  # a view of another storage: only PyTorch < 1.0 wrote those
        ):
            raise pickle.UnpicklingError(f"a persistent id that is not a model class or a storage: {str(pid)[:60]}")
        _, dtype, key, _, numel, _ = pid
        if key not in self.storages:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if not 0 <= nbytes <= self.limit:
                raise pickle.UnpicklingError(f"a storage of {nbytes} bytes in a file of {self.limit}")
            self.storages[key] = _Storage(torch.empty(nbytes, dtype=torch.uint8), dtype)
        return self.storages[key]


def _read_legacy(path: str) -> dict[str, np.ndarray]:
    """torch's pre-1.6 format: five pickles, each checked then read by `_LegacyUnpickler`, then the storage bytes."""
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
    check_pickle(stream, path)  # before torch is needed: a plain pickle names its globals here
    torch = _import_torch(path)
    table, storages = _legacy_table(torch), {}
    try:
        values = []
        for i in range(_LEGACY_PICKLES):
            if i:
                check_pickle(stream, path)
            values.append(_LegacyUnpickler(stream, table, storages, len(stream.getvalue())).load())
            if len(values) == 1 and values[0] != torch.serialization.MAGIC_NUMBER:
                raise WeightFileError(f"{path}: a pickle that is not a PyTorch file (nor safetensors, nor .npz)")
        _, version, system, obj, keys = values
        if version != torch.serialization.PROTOCOL_VERSION or not system.get("little_endian"):
            raise WeightFileError(f"{path}: a legacy PyTorch file of format {version} or big-endian: not read")
        _fill_storages(stream, [storages[k] for k in keys])
    except WeightFileError:
        raise
    except (
        pickle.UnpicklingError,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        RuntimeError,
        AttributeError,
        struct.error,
    ) as e:
        raise unreadable(path, "PyTorch", e) from e
    return _arrays(obj, path, torch)


def _fill_storages(stream: IO[bytes], storages: Iterable[_Storage]) -> None:
    """Read each storage's bytes: its element count (8 bytes, little-endian), then the elements."""
    for storage in storages:
        head = stream.read(8)
        if len(head) != 8:
            raise EOFError("the file ends before a storage's size")
        (count,) = struct.unpack("<q", head)
        buffer = storage.data.numpy()
        if count * storage.data.new_empty((), dtype=storage.dtype).element_size() != buffer.size:
            raise ValueError(f"a storage of {count} elements where {buffer.size} bytes were declared")
        if stream.readinto(memoryview(buffer)) != buffer.size:
            raise EOFError("the file ends inside a storage")


# ----------------------------------------------------------------------------- finding the weights


def _arrays(obj: Any, path: str, torch: types.ModuleType) -> dict[str, np.ndarray]:
    """The state dict in what was unpickled, as numpy arrays."""
    return {name: _tensor_to_numpy(t) for name, t in find_state_dict(obj, path, torch.Tensor).items()}


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def find_state_dict(obj: Any, path: str, tensor_type: type) -> Mapping[str, Any]:
    """The state dict in an unpickled object: a pickled model, a state dict, or a checkpoint dict holding one."""
    if isinstance(obj, StandIn):
        obj = module_state_dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, tensor_type) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj:
                return find_state_dict(obj[key], path, tensor_type)
    keys = f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else ""
    raise WeightFileError(f"{path}: no model weights found in it (a {type(obj).__name__}{keys})")


def module_state_dict(module: StandIn, prefix: str = "", seen: set[int] | None = None) -> dict[str, Any]:
    """What `nn.Module.state_dict()` gives, read from a stand-in's pickled attributes (each module once)."""
    seen = set() if seen is None else seen
    seen.add(id(module))
    state = module.pickled
    mapping: Callable[[str], Mapping] = lambda key: v if isinstance(v := state.get(key), Mapping) else {}
    skipped = v if isinstance(v := state.get("_non_persistent_buffers_set"), set) else set()
    out = {f"{prefix}{k}": v for k, v in mapping("_parameters").items() if v is not None}
    out |= {f"{prefix}{k}": v for k, v in mapping("_buffers").items() if v is not None and k not in skipped}
    for name, child in mapping("_modules").items():
        if isinstance(child, StandIn) and id(child) not in seen:
            out |= module_state_dict(child, f"{prefix}{name}.", seen)
    return out
