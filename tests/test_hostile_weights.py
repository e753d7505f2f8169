"""Hostile weight files: whatever a file calls, however it is packed and whatever its name, reading it runs
nothing and ends in one line naming the file; honest files are read by what they hold, not by their name.

Every payload, if it ran, would write the file `pwned` in the test's directory. The pickles are written by
hand (opcode by opcode) so that they name exactly the globals an attacker would: the dotted paths of
protocol 4, the functions reachable through torch, numpy and collections, and loaders that unpickle again.
"""

import io
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import ROOT

from pmg_jax import convert, weightfile

MARKER = "pwned"
NAMES = ("weights.pth", "weights.npz", "weights.NPZ", "weights.safetensors", "w.safetensors.bak")
PROTO2, PROTO4 = b"\x80\x02", b"\x80\x04"


# ----------------------------------------------------------------------------- writing pickles by hand


def glob(module: str, name: str) -> bytes:
    """GLOBAL: push `module.name` (protocol 4 resolves a dotted name attribute by attribute)."""
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    """BINUNICODE: push a string."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: push func(*args)."""
    return func + b"(" + b"".join(args) + b"tR"


def stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): the module and name come from the stack."""
    return text(module) + text(name) + b"\x93"


class Payload(NamedTuple):
    """Pickle opcodes that, run by an unrestricted unpickler, write the marker file; the global named first."""

    expected: str
    ops: Callable[[Path], bytes]  # the test's directory -> opcodes
    protocol: bytes = PROTO2


def write_marker(d: Path) -> str:
    return f"open({str(d / MARKER)!r}, 'w').write('ran')"


def shell(d: Path) -> str:
    return f"touch {d / MARKER}"


def inner_pickle(d: Path) -> bytes:
    """A plain pickle that calls exec: what the loaders reached from a payload are made to read."""
    return PROTO2 + call(glob("builtins", "exec"), text(write_marker(d))) + b"."


def inner_file(d: Path) -> str:
    (d / "inner.pkl").write_bytes(inner_pickle(d))
    return str(d / "inner.pkl")


PAYLOADS = {
    "builtins.exec": Payload("builtins.exec", lambda d: call(glob("builtins", "exec"), text(write_marker(d)))),
    "builtins.eval": Payload("builtins.eval", lambda d: call(glob("builtins", "eval"), text(write_marker(d)))),
    "builtins.getattr": Payload(
        "builtins.getattr",
        lambda d: call(
            call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), text("os")), text("system")),
            text(shell(d)),
        ),
    ),
    # __import__('os') parked in a list and the memo, then getattr(that, 'system')(...)
    "builtins.__import__": Payload(
        "builtins.__import__",
        lambda d: (
            b"]"
            + call(glob("builtins", "__import__"), text("os"))
            + b"q\x00a"
            + call(call(glob("builtins", "getattr"), b"h\x00", text("system")), text(shell(d)))
        ),
    ),
    "os.system": Payload("os.system", lambda d: call(glob("os", "system"), text(shell(d)))),
    "posix.system": Payload("posix.system", lambda d: call(glob("posix", "system"), text(shell(d)))),
    "subprocess.Popen": Payload(
        "subprocess.Popen",
        lambda d: call(glob("subprocess", "Popen"), b"(" + text("touch") + text(str(d / MARKER)) + b"t"),
    ),
    "STACK_GLOBAL os.system": Payload(
        "os.system", lambda d: call(stack_global("os", "system"), text(shell(d))), PROTO4
    ),
    "torch.os.system": Payload("torch.os.system", lambda d: call(glob("torch", "os.system"), text(shell(d))), PROTO4),
    "torch._utils._import_dotted_name": Payload(
        "torch._utils._import_dotted_name",
        lambda d: call(call(glob("torch._utils", "_import_dotted_name"), text("os.system")), text(shell(d))),
    ),
    # torch.load(inner, None, pickle): a pickle_module given means weights_only=False
    "torch.serialization.load": Payload(
        "torch.serialization.load",
        lambda d: call(
            glob("torch.serialization", "load"), text(inner_file(d)), b"N", glob("torch.serialization", "pickle")
        ),
    ),
    "numpy runstring": Payload(
        "numpy.testing._private.utils.runstring",
        lambda d: call(glob("numpy.testing._private.utils", "runstring"), text(write_marker(d)), b"}"),
    ),
    "numpy.__builtins__": Payload(
        "numpy.__builtins__.get",
        lambda d: call(call(glob("numpy", "__builtins__.get"), text("exec")), text(write_marker(d))),
        PROTO4,
    ),
    "numpy.load allow_pickle": Payload(
        "numpy.load", lambda d: call(glob("numpy", "load"), text(inner_file(d)), b"N", b"\x88")
    ),
    "collections.__builtins__": Payload(
        "collections.__builtins__.get",
        lambda d: call(call(glob("collections", "__builtins__.get"), text("exec")), text(write_marker(d))),
        PROTO4,
    ),
    "pickle.loads": Payload(
        "pickle.loads",
        lambda d: call(
            glob("pickle", "loads"),
            call(glob("_codecs", "encode"), text(inner_pickle(d).decode("latin1")), text("latin1")),
        ),
    ),
}


# ----------------------------------------------------------------------------- packing a payload into a file


def bare(p: Payload, d: Path) -> bytes:
    return p.protocol + p.ops(d) + b"."


def in_state_dict(p: Payload, d: Path) -> bytes:
    """{'conv.weight': None, 'extra': payload}"""
    return p.protocol + b"}(" + text("conv.weight") + b"N" + text("extra") + p.ops(d) + b"u."


def in_whole_model(p: Payload, d: Path) -> bytes:
    """A stand-in-able `model.PMG` whose pickled attributes hold the payload, as torch.save(net) writes a model."""
    return p.protocol + glob("model", "PMG") + b")\x81}(" + text("_modules") + p.ops(d) + b"ub."


def torch_zip(pickled: bytes) -> bytes:
    """torch's zip format around `pickled` (the archive of torch.save({}) with its data.pkl replaced)."""
    template = io.BytesIO()
    torch.save({}, template)
    out = io.BytesIO()
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickled if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def torch_legacy(pickled: bytes) -> bytes:
    """torch's pre-1.6 format: magic number, version, system info, `pickled`, its (no) storage keys."""
    system = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(v, protocol=2) for v in (torch.serialization.MAGIC_NUMBER, 1001, system))
    return head + pickled + pickle.dumps([], protocol=2)


CONTAINERS = {
    "bare pickle": bare,
    "state dict pickle": in_state_dict,
    "whole model pickle": in_whole_model,
    "torch zip, state dict": lambda p, d: torch_zip(in_state_dict(p, d)),
    "torch zip, whole model": lambda p, d: torch_zip(in_whole_model(p, d)),
    "torch legacy, bare": lambda p, d: torch_legacy(bare(p, d)),
    "torch legacy, whole model": lambda p, d: torch_legacy(in_whole_model(p, d)),
}


def assert_refused(message: str, path: Path, *expected: str) -> None:
    assert "\n" not in message and message.startswith(str(path)), message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_payload_runs_whatever_the_packing_and_name(tmp_path, payload, container):
    data = CONTAINERS[container](PAYLOADS[payload], tmp_path)
    for name in NAMES:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(convert.ConversionError) as error:
            convert.load_state_dict(str(path))
        assert_refused(str(error.value), path, "refuses to load: it calls ", f" {PAYLOADS[payload].expected},")
    assert not (tmp_path / MARKER).exists()


class ExecOnUnpickle:
    """An object whose unpickling calls exec (what np.save pickles into an object array)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("name", NAMES)
def test_npz_object_array_is_not_unpickled(tmp_path, name):
    np.savez(tmp_path / "x.npz", w=np.array([ExecOnUnpickle(write_marker(tmp_path))], dtype=object))
    path = tmp_path / name
    path.write_bytes((tmp_path / "x.npz").read_bytes())
    with pytest.raises(convert.ConversionError) as error:
        convert.load_state_dict(str(path))
    assert_refused(str(error.value), path, "cannot read it as a numpy .npz file", "allow_pickle=False")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize(
    "data,expected",
    [
        (PROTO2 + glob("mymodels", "Net") + b")\x81}b.", "refuses to load: it calls mymodels.Net,"),
        (pickle.dumps({"a": 1}, protocol=2), "a pickle that is not a PyTorch file"),
        (pickle.dumps({"a": 1}, protocol=4), "refuses to load: it uses the pickle opcode "),
        (torch_legacy(PROTO2 + b"(" + text("module") + glob("model", "PMG") + b"NNtQ."), "no model weights found"),
        (b"\x93NUMPY\x01\x00" + b"x" * 64, "not a weight file: neither a PyTorch file, a safetensors file nor"),
        (b"def f():\n    pass\n", "not a weight file"),
    ],
    ids=["unknown class", "plain pickle", "protocol 4 opcodes", "bare legacy class", "npy", "text"],
)
def test_other_files_are_refused_in_one_line(tmp_path, data, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    with pytest.raises(convert.ConversionError) as error:
        convert.load_state_dict(str(path))
    assert_refused(str(error.value), path, expected)


def test_other_zip_archives_are_refused(tmp_path):
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", b"")
        archive.writestr("run.py", "import os")
    with pytest.raises(convert.ConversionError, match="a zip archive that is neither a PyTorch file nor a numpy"):
        convert.load_state_dict(str(path))


# ----------------------------------------------------------------------------- honest files, by content


@pytest.fixture(scope="module")
def honest_files(tmp_path_factory):
    """A small ResNet-like state dict in every format, each copied under the other formats' names."""
    d = tmp_path_factory.mktemp("honest")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net[1].running_mean.uniform_()
    sd = net.state_dict()
    torch.save(sd, d / "zip")
    torch.save(sd, d / "legacy", _use_new_zipfile_serialization=False)
    torch.save(net, d / "whole_zip")
    torch.save(net, d / "whole_legacy", _use_new_zipfile_serialization=False)
    arrays = {k: v.numpy() for k, v in sd.items()}
    safetensors.numpy.save_file(arrays, d / "safetensors")
    np.savez(d / "npz.npz", **arrays)
    (d / "npz.npz").rename(d / "npz")
    return d, {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}


@pytest.mark.parametrize("kind", ["zip", "legacy", "whole_zip", "whole_legacy", "safetensors", "npz"])
@pytest.mark.parametrize("name", NAMES)
def test_honest_files_are_read_by_content_whatever_their_name(honest_files, tmp_path, kind, name):
    d, want = honest_files
    path = tmp_path / name
    path.write_bytes((d / kind).read_bytes())
    got = convert.load_state_dict(str(path))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ----------------------------------------------------------------------------- through the command lines


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


CLI_CASES = [
    pytest.param("builtins.exec", "torch zip, whole model", "weights.safetensors.bak", marks=pytest.mark.slow),
    pytest.param("STACK_GLOBAL os.system", "torch legacy, whole model", "weights.NPZ", marks=pytest.mark.slow),
    # The fast tier's; every payload is refused in process above.
    ("numpy runstring", "state dict pickle", "weights.npz"),
]


@pytest.mark.parametrize("payload,container,name", CLI_CASES)
def test_convert_command_refuses_and_runs_nothing(tmp_path, payload, container, name):
    path = tmp_path / name
    path.write_bytes(CONTAINERS[container](PAYLOADS[payload], tmp_path))
    result = run(["-m", "pmg_jax.convert", str(path), "--out", str(tmp_path / "run")], ROOT)
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip()
    assert_refused(error.removeprefix("pmg_jax.convert: error: "), path, f"it calls {PAYLOADS[payload].expected},")
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "run").exists()


TINY_TRAIN = [
    "--config",
    "configs/demo.py",
    "--config.model.width=8",
    "--config.model.feature_size=16",
    "--config.dataset.demo_train_size=16",
    "--config.dataset.demo_test_size=8",
]


@pytest.mark.parametrize(
    "flag,payload,container,expected",
    [
        pytest.param(
            "init.backbone",
            "os.system",
            "torch legacy, whole model",
            "refuses to load: it calls os.system,",
            marks=pytest.mark.slow,  # a train command in a fresh process; the other one is the fast tier's
        ),
        ("init.checkpoint", "builtins.exec", "torch zip, state dict", "weights.pth: no checkpoints found"),
    ],
)
def test_train_refuses_before_training_and_runs_nothing(tmp_path, flag, payload, container, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(CONTAINERS[container](PAYLOADS[payload], tmp_path))
    workdir = tmp_path / "run"
    result = run(["train.py", *TINY_TRAIN, f"--workdir={workdir}", f"--config.{flag}={path}"], ROOT)
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and expected in error, result.stderr[-2000:]
    assert not (tmp_path / MARKER).exists()
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("flag", ["init.backbone", "init.checkpoint"])
def test_a_refused_init_file_costs_no_initialisation(tmp_path, flag):
    """train reads init.* before it draws the seed's weights (for a ResNet50 at 448, minutes of compiling on a
    CPU): a hostile or unreadable file is refused first, and the fresh weights are never asked for."""
    from conftest import tiny_demo_config

    from pmg_jax import loop
    from pmg_jax.errors import PMGError

    path = tmp_path / "weights.pth"
    path.write_bytes(CONTAINERS["torch legacy, whole model"](PAYLOADS["os.system"], tmp_path))
    drawn = []
    with pytest.raises(PMGError, match="weights.pth"):
        loop.initial_variables(tiny_demo_config(**{flag: str(path)}), lambda: drawn.append(flag))
    assert drawn == [] and not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("kind", ["legacy", "whole_legacy", "zip"])
def test_truncated_torch_files_are_refused(honest_files, tmp_path, kind):
    d, _ = honest_files
    data = (d / kind).read_bytes()
    path = tmp_path / "weights.pth"
    cuts = {len(data) * k // 16 for k in range(1, 16)} | {len(data) - 10}
    if kind != "zip":  # a legacy file's five pickles, then each storage's 8-byte size and bytes: cut at and in one
        stream = io.BytesIO(data)
        for _ in range(5):
            for _ in pickletools.genops(stream):  # one pickle, to its STOP
                pass
        cuts |= {stream.tell(), stream.tell() + 4}
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        with pytest.raises(convert.ConversionError) as error:
            convert.load_state_dict(str(path))
        assert_refused(str(error.value), path, "cannot read it as a PyTorch file (truncated or corrupt?)")


def test_the_scan_names_each_global_in_order_and_runs_nothing(tmp_path):
    """weightfile.pickle_globals reads a pickle's globals with pickletools: a GLOBAL and a protocol-4 STACK_GLOBAL
    (whose names come from the stack, here one fetched back from the memo) are both named, nothing is run."""
    ops = (
        PROTO4
        + call(glob("collections", "OrderedDict"))
        + b"0"  # POP
        + text("os")
        + b"\x94"  # MEMOIZE: the module name, fetched back below
        + b"0"
        + b"h\x00"  # BINGET 0
        + text("system")
        + b"\x93"
        + b"("
        + text(shell(tmp_path))
        + b"tR."
    )
    found, opcodes = weightfile.pickle_globals(io.BytesIO(ops))
    assert found == ["collections.OrderedDict", "os.system"]
    assert {"STACK_GLOBAL", "MEMOIZE", "BINGET", "REDUCE"} <= opcodes
    assert not (tmp_path / MARKER).exists()
