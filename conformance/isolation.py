"""The engine under test runs in a child process; the verdict stays in the parent.

The parent (the suite: checks, oracle, comparison, counting, report) talks to the child (the
adapter and everything it imports) through one pipe. The engine cannot patch the suite's code,
hang it, or end it: every call has a deadline, a dead child is a failed check, and nothing the
child sends can run code in the parent.

    parent                                     child (own session, SIGINT ignored, stdout -> stderr)
    EngineProxy.generate(prompts, params) ──►  adapter.generate(prompts, params)
      outputs checked against the requests ◄──  list[RequestOutput] as data
    engine = EngineProxy.make_engine()    ──►  LLMEngine(...) stays here; the parent gets a
    engine.step()  (a Proxy)              ──►  handle whose calls are forwarded
    kv / Request objects of the checks    ◄──  the child calls back into the parent's objects

What crosses the pipe:
- Data, by value: builtin scalars and containers, tensors (raw bytes and the device they were on;
  arguments a call changed in place are copied back), `torch.device`s, enums, frozen dataclasses
  compared by value, and `RequestOutput`, `CompletionOutput`, `Logprob`, `SamplingParams`.
- From the suite only, by value too: a scheduling policy (`fast.core.policy.SchedulingPolicy`, in
  the scheduler tier's `SchedulerConfig`). The engine's scheduler gets its own copy, its class
  imported in the engine process by name; a policy is pure, so the copy chooses as the original.
- A tensor is rebuilt on the sender's device when the receiver has it, as in one process: the
  engine's CUDA kernels get CUDA tensors from the checks, and the checks get the engine's CUDA
  outputs on CUDA. A device the receiver lacks (no CUDA, fewer GPUs, another kind) gives a CPU
  tensor of the same dtype, shape and values: a check that compares on CPU (`.cpu()` on both
  sides) gives the same verdict either way.
- Anything else, by reference: the receiver gets a `Proxy` whose attribute reads, method calls,
  `len`, iteration and indexing are forwarded; the same object always arrives as the same proxy.

Safety of the parent:
- It decodes the child's bytes with `SafeUnpickler`, whose `find_class` admits only the rebuild
  functions of this module and a few builtin containers, so no engine code runs on unpickling;
  dataclasses and enums are rebuilt only for classes the parent has already imported.
- A call from the child into a parent object may read or set public attributes and call bound
  methods of objects the parent handed over; never private names, modules, classes or functions.
- `EngineFailure` (a BaseException, so neither Hypothesis nor a check's `except Exception` takes
  it for an ordinary failing example) ends the check when the engine hangs past the deadline,
  dies (exit code, signal), or raises a BaseException (SystemExit, KeyboardInterrupt). The child
  is then killed (with its whole session) and the next check starts a fresh one.
- A message the child sends that makes a call while it is decoded, names a non-allowed global,
  or carries a dataclass with extra attributes is refused: the check fails ("undecodable data").

Cost: one round trip per forwarded call (about 0.2 ms on 2 busy cores); the stateful tiers make
thousands, and `quick` on `fast` takes ~35 s instead of ~20 s in one process.

Limits: the child is an ordinary process of the same user; it can still write files, or signal
or kill the parent (then the run ends without a report, and never with exit code 0).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import signal
import sys
import time
import traceback
import types
import weakref
from typing import Any

# Classes sent by value although they are mutable dataclasses: the API's plain data records.
DATA_CLASSES = frozenset({("ref.outputs", "RequestOutput"), ("ref.outputs", "CompletionOutput"),
                          ("ref.outputs", "Logprob"), ("ref.sampling_params", "SamplingParams"),
                          ("ref.sampling_params", "StructuredOutputsParams")})
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
# A tensor crosses with its device's (type, index); the receiver rebuilds it there if that is
# the CPU or a CUDA device it has, else on the CPU (see `local_device`).
MAX_DEVICE_INDEX = 1 << 16
REPR_LIMIT = 800  # characters of a call's arguments quoted in a timeout message
POLL_SLICE_S = 1.0  # how often the parent checks that the child still lives while waiting

# Builtin exception classes an engine's exception is re-raised as (its nearest one by MRO).
_BUILTIN_ERRORS = {cls.__name__: cls for cls in (
    ValueError, TypeError, KeyError, IndexError, LookupError, AttributeError, NotImplementedError,
    AssertionError, RuntimeError, ArithmeticError, ZeroDivisionError, OverflowError, MemoryError,
    OSError, StopIteration, UnicodeError, RecursionError, Exception)}


class EngineFailure(BaseException):
    """The engine hung, died, or raised a BaseException: the current check fails at once."""


class RemoteError(Exception):
    """Base of the exceptions re-raised in the parent for an exception raised in the engine."""

    remote_type = "Exception"
    remote_traceback = ""


_error_classes: dict[tuple[str, type], type] = {}


def remote_exception(type_name: str, bases: list[str], message: str, tb: str) -> RemoteError:
    """The engine's exception as one of the parent's classes: a subclass of the nearest builtin
    exception in its MRO (so `except ValueError` in a check still works) and of RemoteError."""
    base = next((_BUILTIN_ERRORS[b] for b in bases if b in _BUILTIN_ERRORS), Exception)
    name = type_name if type_name.isidentifier() else "EngineError"
    cls = _error_classes.get((name, base))
    if cls is None:
        bases = (RemoteError,) if issubclass(RemoteError, base) else (base, RemoteError)  # Exception itself
        cls = _error_classes[(name, base)] = type(name, bases, {"__module__": "engine"})
    err = cls(message)
    err.remote_type, err.remote_traceback = type_name, tb
    return err


# ----------------------------------------------------------------------------- proxies


class Proxy:
    """An object that lives in the other process. Identity is preserved: the same remote object
    always arrives as the same proxy while it is alive."""

    __slots__ = ("_ep", "_oid", "_tname", "_methods", "_cell", "__weakref__")

    def __getattr__(self, name: str):
        if name.startswith("__") or name in Proxy.__slots__:
            raise AttributeError(name)
        if name in self._methods:
            return _Method(self, name)
        return self._ep.request("getattr", self, name)

    def __setattr__(self, name: str, value) -> None:
        if name in Proxy.__slots__:
            object.__setattr__(self, name, value)
        else:
            self._ep.request("setattr", self, name, value)

    def __call__(self, *args, **kwargs):
        return self._ep.request("call", self, args, kwargs)

    def __len__(self) -> int:
        return self._ep.request("len", self)

    def __iter__(self):
        return iter(self._ep.request("list", self))

    def __getitem__(self, key):
        return self._ep.request("getitem", self, key)

    def __contains__(self, item) -> bool:
        return self._ep.request("contains", self, item)

    def __bool__(self) -> bool:
        return self._ep.request("bool", self)

    def __repr__(self) -> str:
        return f"<{self._tname} in the {self._ep.peer_name} process>"


class _Method:
    """A bound method of a proxied object: one round trip per call, none to look it up."""

    __slots__ = ("proxy", "name")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args, **kwargs):
        return self.proxy._ep.request("callmethod", self.proxy, self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<method {self.proxy._tname}.{self.name} in the {self.proxy._ep.peer_name} process>"


_method_names: dict[type, frozenset] = {}


def method_names(obj: Any) -> frozenset:
    """Public callables of `obj`'s class, so that the peer's proxy calls them in one round trip."""
    cls = type(obj)
    names = _method_names.get(cls)
    if names is None:
        names = frozenset(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n, None))
                          and not isinstance(getattr(cls, n, None), type))
        _method_names[cls] = names
    return names


# ----------------------------------------------------------------------------- encoding

def _torch():
    return sys.modules.get("torch")


def _tensor_bytes(t) -> tuple[str, tuple[int, ...], bytes, tuple[str, int | None]]:
    """What `_rebuild_tensor` needs: dtype name, shape, raw bytes (copied to CPU), and the
    device record (type, index) of the tensor's device."""
    torch = _torch()
    device = (t.device.type, t.device.index)
    if t.device.type == "meta":
        raise TypeError("cannot send a tensor on the meta device (it has no data) between processes")
    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in TENSOR_DTYPES:
        raise TypeError(f"cannot send a tensor of dtype {t.dtype} between processes")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, tuple(t.shape), raw, device


def _check_device_record(device) -> tuple[str, int | None]:
    """A (type, index) pair of plain values, or UnpicklingError: nothing in it is called."""
    if not (isinstance(device, tuple) and len(device) == 2 and type(device[0]) is str
            and device[0].isidentifier() and len(device[0]) <= 16
            and (device[1] is None or (type(device[1]) is int and 0 <= device[1] < MAX_DEVICE_INDEX))):
        raise pickle.UnpicklingError(f"bad device record {device!r:.100}")
    return device


def local_device(device: tuple[str, int | None]):
    """Where this process rebuilds a tensor that was on `device` (a (type, index) record): on that
    CUDA device if this process has it, else on the CPU (the values are the same either way)."""
    import torch

    type_name, index = _check_device_record(device)
    if type_name == "cuda" and torch.cuda.is_available() and (index or 0) < torch.cuda.device_count():
        return torch.device("cuda", index)
    return torch.device("cpu")


def _rebuild_tensor(dtype_name: str, shape: tuple, raw: bytes, device: tuple):
    import torch

    if dtype_name not in TENSOR_DTYPES or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise pickle.UnpicklingError(f"bad tensor: dtype {dtype_name!r}, shape {shape!r}")
    target = local_device(device)
    dtype = getattr(torch, dtype_name)
    numel = 1
    for s in shape:
        numel *= s
    if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
        raise pickle.UnpicklingError(f"bad tensor: {len(raw)} bytes for shape {shape} {dtype_name}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=target)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return t if target.type == "cpu" else t.to(target)


def _rebuild_dtype(name: str):
    import torch

    if name not in TENSOR_DTYPES:
        raise pickle.UnpicklingError(f"bad dtype {name!r}")
    return getattr(torch, name)


def _rebuild_device(type_name: str, index):
    """A `torch.device` as it was sent: a name, whether or not this process has the device
    (`local_device` decides where tensors go)."""
    import torch

    type_name, index = _check_device_record((type_name, index))
    try:
        return torch.device(type_name, index)
    except (RuntimeError, ValueError) as err:
        raise pickle.UnpicklingError(f"bad device {type_name!r}: {err}") from None


def _known_class(module: str, qualname: str) -> type | None:
    """A class the parent already imported (it never imports one: that would run engine code)."""
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) else None


class RemoteRecord:
    """A frozen record whose class the parent never imported: its fields, read-only."""

    def __init__(self, type_name: str, fields: dict):
        object.__setattr__(self, "_type_name", type_name)
        object.__setattr__(self, "_fields", dict(fields))

    def __getattr__(self, name: str):
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"{self._type_name} has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"{self._type_name} is read-only")

    def __eq__(self, other):
        return isinstance(other, RemoteRecord) and (self._type_name, self._fields) == (other._type_name, other._fields)

    __hash__ = None

    def __repr__(self) -> str:
        return f"{self._type_name}({', '.join(f'{k}={v!r}' for k, v in self._fields.items())})"


def _rebuild_record(module: str, qualname: str, fields: dict):
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise pickle.UnpicklingError(f"bad record of {module}.{qualname}")
    cls = _known_class(module, qualname)
    if cls is None or not dataclasses.is_dataclass(cls):
        return RemoteRecord(qualname, fields)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise pickle.UnpicklingError(f"{qualname}: fields {sorted(fields)}, expected {sorted(names)}")
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)  # no __init__/__post_init__: nothing but field values
    return obj


def _rebuild_enum(module: str, qualname: str, name: str):
    cls = _known_class(module, qualname)
    if cls is None or not issubclass(cls, enum.Enum) or name not in cls.__members__:
        return RemoteRecord(qualname, {"name": name})
    return cls[name]


def _is_record(obj: Any) -> bool:
    """Sent by value: the data classes above, and frozen dataclasses compared by value (one with
    eq=False is compared by identity, so it must stay one object: it goes by reference)."""
    cls = type(obj)
    if not dataclasses.is_dataclass(cls) or isinstance(obj, type):
        return False
    params = cls.__dataclass_params__
    return (params.frozen and params.eq) or (cls.__module__, cls.__qualname__) in DATA_CLASSES


def _is_policy(obj: Any) -> bool:
    """A `fast.core.policy.SchedulingPolicy` (only if the suite imported that module: the check
    itself imports nothing)."""
    cls = _known_class("fast.core.policy", "SchedulingPolicy")
    return cls is not None and isinstance(obj, cls)


class _Encoder(pickle.Pickler):
    """Pickles a message: data by value, everything else as a reference into the sender's table.
    Exact builtin scalars and containers never reach `reducer_override` (pickle's fast path)."""

    def __init__(self, file, ep: "Endpoint"):
        super().__init__(file, protocol=5)
        self.ep = ep
        self.tensors: list = []  # in pickling order, for copy-back of in-place changes

    def reducer_override(self, obj):
        ep = self.ep
        if id(obj) in _WIRE_CALLABLE_IDS:  # the callables of the reductions below: by name
            return NotImplemented
        if isinstance(obj, Proxy):
            if obj._ep is not ep:
                raise TypeError(f"{obj!r} belongs to another engine process")
            return _yours, (obj._oid,)
        torch = _torch()
        if torch is not None and isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return _rebuild_tensor, _tensor_bytes(obj)
        if torch is not None and isinstance(obj, torch.device):
            return _rebuild_device, (obj.type, obj.index)
        if ep.is_parent and (_is_record(obj) or isinstance(obj, (enum.Enum, type, types.FunctionType,
                                                                 types.BuiltinFunctionType)) or _is_policy(obj)):
            return NotImplemented  # the child trusts the suite: ordinary pickling, classes by name
        if torch is not None and isinstance(obj, torch.dtype):
            return _rebuild_dtype, (str(obj).removeprefix("torch."),)
        if isinstance(obj, enum.Enum):
            return _rebuild_enum, (type(obj).__module__, type(obj).__qualname__, obj.name)
        if isinstance(obj, bool):
            return bool, (bool(obj),)
        for base in (int, float, str, bytes):  # subclasses (numpy scalars, str enums) as the base
            if isinstance(obj, base):
                return base, (base(obj),)
        if isinstance(obj, (list, tuple, dict, set, frozenset)) and not hasattr(obj, "_fields"):
            base = next(b for b in (list, tuple, dict, set, frozenset) if isinstance(obj, b))
            return base, (list(obj.items()) if base is dict else list(obj),)
        if _is_record(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return _rebuild_record, (type(obj).__module__, type(obj).__qualname__, fields)
        if obj is None or isinstance(obj, (complex, slice, range, type(Ellipsis))):
            return NotImplemented
        return ep.export(obj)


def _remote(oid, tname, methods):  # placeholders: each decoder binds these names to its endpoint
    raise pickle.UnpicklingError("_remote outside a decoder")


def _yours(oid):
    raise pickle.UnpicklingError("_yours outside a decoder")


_SAFE_GLOBALS = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "list"): list,
    ("builtins", "tuple"): tuple, ("builtins", "dict"): dict, ("builtins", "int"): int,
    ("builtins", "float"): float, ("builtins", "str"): str, ("builtins", "bytes"): bytes,
    ("builtins", "bool"): bool, ("builtins", "complex"): complex, ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    (__name__, "_rebuild_tensor"): _rebuild_tensor, (__name__, "_rebuild_dtype"): _rebuild_dtype,
    (__name__, "_rebuild_device"): _rebuild_device,
    (__name__, "_rebuild_record"): _rebuild_record, (__name__, "_rebuild_enum"): _rebuild_enum,
}


_WIRE_CALLABLE_IDS = frozenset(id(f) for f in (*_SAFE_GLOBALS.values(), _remote, _yours))


class SafeUnpickler(pickle.Unpickler):
    """Decodes what the child sent. Only the rebuild functions above can be named by the bytes;
    anything else (os.system, the engine's classes, torch's own unpickling) is refused."""

    def __init__(self, file, ep: "Endpoint"):
        super().__init__(file)
        self.ep = ep
        self.tensors: list = []

    def find_class(self, module: str, name: str):
        if (module, name) == (__name__, "_remote"):
            return self.ep.receive_proxy
        if (module, name) == (__name__, "_yours"):
            return self.ep.lookup
        if (module, name) == (__name__, "_rebuild_tensor"):
            return self._tensor
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the engine sent a reference to {module}.{name}, which is not data") from None

    def _tensor(self, *args):
        t = _rebuild_tensor(*args)
        self.tensors.append((t, t._version))
        return t


class _TrustingUnpickler(SafeUnpickler):
    """Decodes what the parent sent (the child trusts the suite): any importable name."""

    def find_class(self, module: str, name: str):
        if module == __name__ and name in ("_remote", "_yours", "_rebuild_tensor"):
            return super().find_class(module, name)
        return pickle.Unpickler.find_class(self, module, name)


def _check_decoded(value) -> None:
    """After decoding the child's bytes: no dataclass instance carries attributes beyond its
    fields (a crafted BUILD opcode could add some). Each object is visited once."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen or isinstance(v, (str, bytes, int, float, Proxy)) or v is None:
            continue
        seen.add(id(v))
        if isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            names = [f.name for f in dataclasses.fields(v)]
            if hasattr(v, "__dict__") and set(vars(v)) - set(names):
                raise pickle.UnpicklingError(
                    f"{type(v).__name__} arrived with extra attributes {sorted(set(vars(v)) - set(names))}")
            stack.extend(getattr(v, n) for n in names)


# ----------------------------------------------------------------------------- the channel

class _LazyText:
    """A message formatted only if it is shown (most calls succeed)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __str__(self) -> str:
        return self.fn(*self.args)

    def __bool__(self) -> bool:
        return True


def describe_call(op: str, target: Any, args: tuple) -> str:
    """`Type.method(args...)`, arguments truncated: what a timeout message quotes."""
    tname = getattr(target, "_tname", "engine") if isinstance(target, Proxy) else "engine"
    if op == "callmethod":
        name, cargs, ckwargs = args
        parts = [repr(a) for a in cargs] + [f"{k}={v!r}" for k, v in ckwargs.items()]
        text = f"{tname}.{name}({', '.join(parts)})"
    elif op == "call":
        cargs, ckwargs = args
        text = f"{tname}({', '.join([repr(a) for a in cargs] + [f'{k}={v!r}' for k, v in ckwargs.items()])})"
    else:
        text = f"{op} {tname} {', '.join(repr(a) for a in args)}"
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + f"... ({len(text)} characters)"


class Endpoint:
    """One side of the pipe: sends requests and waits for their reply, serving the peer's
    requests (callbacks) meanwhile; exports local objects and holds proxies of the peer's."""

    def __init__(self, conn, *, is_parent: bool):
        self.conn = conn
        self.is_parent = is_parent
        self.peer_name = "engine" if is_parent else "suite"
        self.objects: dict[int, Any] = {}  # oid -> exported local object
        self.oid_of: dict[int, int] = {}  # id(obj) -> oid
        self.sent: dict[int, int] = {}  # oid -> times sent, not yet released by the peer
        self.next_oid = 1
        self.proxies: weakref.WeakValueDictionary[int, Proxy] = weakref.WeakValueDictionary()
        self.releases: list[tuple[int, int]] = []  # (oid, count) of dead proxies, sent with the next message
        self.deadline: float | None = None  # parent: when the current check's time is up
        self.budget_s: float = 0.0
        self.on_failure = None  # parent: called with a message; kills the child, raises EngineFailure
        self.decoding = False

    # objects -------------------------------------------------------------

    def export(self, obj) -> tuple:
        oid = self.oid_of.get(id(obj))
        if oid is None:
            oid, self.next_oid = self.next_oid, self.next_oid + 1
            self.objects[oid], self.oid_of[id(obj)] = obj, oid
        self.sent[oid] = self.sent.get(oid, 0) + 1
        tname = obj.__qualname__ if isinstance(obj, type) else type(obj).__qualname__
        return _remote, (oid, tname, tuple(method_names(obj)))

    def receive_proxy(self, oid, tname, methods) -> Proxy:
        if not isinstance(oid, int) or not isinstance(tname, str):
            raise pickle.UnpicklingError("bad object reference")
        proxy = self.proxies.get(oid)
        if proxy is None:
            proxy = object.__new__(Proxy)
            cell = [0]
            for k, v in (("_ep", self), ("_oid", oid), ("_tname", tname), ("_cell", cell),
                         ("_methods", frozenset(m for m in methods if isinstance(m, str)))):
                object.__setattr__(proxy, k, v)
            self.proxies[oid] = proxy
            weakref.finalize(proxy, self.releases.append, (oid, cell))
        proxy._cell[0] += 1
        return proxy

    def lookup(self, oid):
        try:
            return self.objects[oid]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"no object #{oid!r} here") from None

    def _apply_releases(self, releases) -> None:
        for oid, count in releases:
            if oid == 0:  # the child's root lives as long as the process
                continue
            left = self.sent.get(oid, 0) - count
            if left > 0:
                self.sent[oid] = left
            elif oid in self.objects:
                obj = self.objects.pop(oid)
                self.sent.pop(oid, None)
                self.oid_of.pop(id(obj), None)

    # wire ----------------------------------------------------------------

    def _send(self, kind: str, body) -> list:
        releases = [(oid, cell[0]) for oid, cell in self.releases]
        self.releases.clear()
        buf = io.BytesIO()
        enc = _Encoder(buf, self)
        enc.dump((kind, releases, body))
        self.conn.send_bytes(buf.getbuffer())
        return enc.tensors

    def _recv(self, waiting_for: str):
        if self.is_parent:
            self._wait_readable(waiting_for)
        try:
            raw = self.conn.recv_bytes()
        except (EOFError, OSError):
            if self.is_parent:
                self.on_failure(None, waiting_for)
            os._exit(0)  # child: the suite is gone
        dec = (SafeUnpickler if self.is_parent else _TrustingUnpickler)(io.BytesIO(raw), self)
        try:
            self.decoding = True
            try:
                msg = dec.load()
            finally:
                self.decoding = False
            if self.is_parent:
                _check_decoded(msg)
            kind, releases, body = msg
            self._apply_releases(list(releases))
        except Exception as err:  # noqa: BLE001 - undecodable bytes from the engine end the check
            if not self.is_parent:
                raise
            self.on_failure(f"the engine sent undecodable data ({type(err).__name__}: {err})", waiting_for)
        return kind, body, dec.tensors

    def _wait_readable(self, waiting_for: str) -> None:
        while True:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                self.on_failure(f"timeout after {self.budget_s:g} s", waiting_for)
            if self.conn.poll(POLL_SLICE_S if left is None else min(left, POLL_SLICE_S)):
                return
            if not self.child_alive():
                self.on_failure(None, waiting_for)

    def child_alive(self) -> bool:
        return True

    # calls ---------------------------------------------------------------

    def request(self, op: str, target, *args):
        """Run `op` on the peer's object `target` and return its value (or raise its error)."""
        if self.conn.closed:
            raise EngineFailure("the engine process is gone (it failed in an earlier call)")
        if self.decoding:  # a crafted REDUCE whose callable is a proxy: no calls while decoding
            raise pickle.UnpicklingError(f"the {self.peer_name} process's data makes a call while it is decoded")
        what = _LazyText(describe_call, op, target, args)
        sent_tensors = self._send("req", (op, target, *args))
        while True:
            kind, body, _ = self._recv(what)
            if kind == "req":
                self._serve(body, [])
                continue
            if kind == "ok":
                value, changed = body
                self._copy_back(sent_tensors, changed)
                return value
            if kind == "err":
                type_name, bases, message, tb, changed = body
                self._copy_back(sent_tensors, changed)
                raise remote_exception(str(type_name), [str(b) for b in bases], str(message), str(tb))
            if kind == "fatal" and self.is_parent:
                type_name, message, tb = body
                self.on_failure(f"the engine raised {type_name}({message}) and its process was ended\n{tb}", what)
            raise RuntimeError(f"unexpected message {kind!r} from the {self.peer_name} process")

    def _copy_back(self, sent_tensors: list, changed) -> None:
        """Arguments the peer changed in place: their new values into the caller's tensors."""
        for index, new in changed:
            if not isinstance(index, int) or not 0 <= index < len(sent_tensors):
                continue
            old = sent_tensors[index]
            if isinstance(new, _torch().Tensor) and new.shape == old.shape and new.dtype == old.dtype:
                with _torch().no_grad():
                    old.copy_(new)

    def _serve(self, body, received: list) -> None:
        """Run the peer's request and reply. In the child a BaseException (SystemExit,
        KeyboardInterrupt) is reported as fatal and ends the process; in the parent it
        propagates (the user's Ctrl-C, or an EngineFailure of a nested call)."""
        op, target, *args = body
        try:
            value = self._execute(op, target, args)
        except Exception as err:  # noqa: BLE001 - the caller gets the error
            bases = [c.__name__ for c in type(err).__mro__]
            self._send("err", (type(err).__qualname__, bases, str(err),
                               "" if self.is_parent else traceback.format_exc(limit=-8), _changed(received)))
            return
        except BaseException as err:
            if self.is_parent:
                raise
            try:
                self._send("fatal", (type(err).__name__, str(err), traceback.format_exc(limit=-8)))
            finally:
                os._exit(70)
        self._send("ok", (value, _changed(received)))

    def _execute(self, op: str, target, args):
        if self.is_parent:
            _check_callback(op, target, args)
        if op == "getattr":
            return getattr(target, args[0])
        if op == "setattr":
            return setattr(target, args[0], args[1])
        if op == "callmethod":
            name, cargs, ckwargs = args
            return getattr(target, name)(*cargs, **ckwargs)
        if op == "call":
            return target(*args[0], **args[1])
        if op == "len":
            return len(target)
        if op == "list":
            return list(target)
        if op == "getitem":
            return target[args[0]]
        if op == "contains":
            return args[0] in target
        if op == "bool":
            return bool(target)
        raise ValueError(f"unknown operation {op!r}")


def _check_callback(op: str, target, args) -> None:
    """What the engine may do to the parent's objects: public attributes and bound methods of the
    objects handed to it (a scheduler updating a request, calling the KV manager); never private
    names, and it never gets a module, class or function of the parent."""
    if op in ("getattr", "setattr", "callmethod"):
        name = args[0]
        if not isinstance(name, str) or name.startswith("_"):
            raise PermissionError(f"the engine may not touch {type(target).__name__}.{name}")
        if op != "setattr":
            value = getattr(target, name)
            if op == "callmethod" and not (callable(value) and getattr(value, "__self__", None) is target):
                raise PermissionError(f"{type(target).__name__}.{name} is not a method")
            if op == "getattr" and isinstance(value, (type, type(os), type(_check_callback))):
                raise PermissionError(f"the engine may not read {type(target).__name__}.{name}")
    elif op == "call":
        if not (callable(target) and hasattr(target, "__self__") and not isinstance(target, type)):
            raise PermissionError(f"the engine may not call {type(target).__name__}")


# ----------------------------------------------------------------------------- child process

def _child_main(fd: int, sys_path: list[str]) -> None:
    """Entry point of the engine process: serve the parent's requests until it goes away."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C is the suite's to handle
    _die_with_parent()
    sys.path[:] = sys_path  # import what the suite can import (e.g. `--engine tests.bad_adapters:x`)
    ep = Endpoint(Connection(fd), is_parent=False)
    ep.objects[0] = _ChildRoot()
    while True:
        kind, body, received = ep._recv("")
        if kind == "req":
            ep._serve(body, received)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the suite's process ends, however it ends. The engine
    process has its own session, so nothing else would stop an engine spinning in a loop (and
    holding the suite's stderr open) after the suite was killed, e.g. by an outer timeout."""
    parent = os.getppid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's EOF on the pipe still ends the loop
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _changed(received: list) -> list:
    return [(i, t) for i, (t, version) in enumerate(received) if t._version != version]


class _ChildRoot:
    """Object #0 of the child: builds adapters."""

    def load_adapter(self, spec: str, model_dir: str, options: dict):
        from conformance.adapters import load_adapter

        quiet_transformers()
        return load_adapter(spec, model_dir, **options)


def quiet_transformers() -> None:
    """No weight-loading progress bars or warnings from transformers in the suite's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- parent side

# Both processes run torch, one at a time. OpenMP threads that spin after a parallel region
# (libgomp's default) steal the other process's cores: measured on 2 cores, the e2e check took
# 77 s with spinning threads and 14 s with OMP_WAIT_POLICY=PASSIVE (35 s in one process).
PASSIVE_THREADS = {"OMP_WAIT_POLICY": "PASSIVE"}


class EngineHost:
    """The parent's handle on the engine process: starts it, times its calls, restarts it after
    a failure. `begin(budget_s)` before a check, `end()` after."""

    def __init__(self, spec: str, model_dir: str, options: dict | None = None):
        self.spec, self.model_dir, self.options = spec, model_dir, options or {}
        self.proc = None
        self.ep: Endpoint | None = None
        self._adapter: EngineProxy | None = None

    @property
    def adapter(self) -> "EngineProxy":
        """The adapter for `model_dir` with `options`, built in the engine process on first use."""
        if self._adapter is None:
            self._adapter = self.make_adapter(self.model_dir, **self.options)
        return self._adapter

    @property
    def alive(self) -> bool:
        return self.ep is not None and self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """A fresh interpreter (not a fork: no state of the suite leaks in), in its own session so
        that the terminal's Ctrl-C reaches only the suite, with its stdout sent to stderr."""
        import json
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
        env = {**PASSIVE_THREADS, **env}
        code = (f"import sys, json; from conformance.isolation import _child_main; "
                f"_child_main({theirs.fileno()}, json.loads(sys.argv[1]))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(sys.path)], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, stdout=2, env=env, start_new_session=True)
        theirs.close()
        ep = Endpoint(Connection(ours.detach()), is_parent=True)
        ep.on_failure = self._fail
        ep.child_alive = lambda: self.proc is not None and self.proc.poll() is None
        ep.deadline, ep.budget_s = self._deadline, self._budget
        self.ep = ep
        self.root = ep.receive_proxy(0, "engine process", ("load_adapter",))

    def begin(self, budget_s: float | None) -> None:
        """Start of a check: its deadline applies to every call until `end()`."""
        self._budget = budget_s or 0.0
        self._deadline = None if budget_s is None else time.monotonic() + budget_s
        if not self.alive:
            self.close()
            self.start()
        self.ep.deadline, self.ep.budget_s = self._deadline, self._budget

    def end(self) -> None:
        self._deadline = None
        if self.ep is not None:
            self.ep.deadline = None

    _deadline: float | None = None
    _budget: float = 0.0

    def make_adapter(self, model_dir: str, **options) -> "EngineProxy":
        """An adapter of the engine under test, built in the engine process."""
        if self.ep is None:
            raise EngineFailure("the engine process is not running")
        handle = self.root.load_adapter(self.spec, model_dir, options)
        return EngineProxy(handle)

    def _fail(self, reason: str | None, waiting_for: str) -> None:
        proc = self.proc
        if reason is None:  # the child died by itself
            try:
                code = proc.wait(5)
            except Exception:  # noqa: BLE001 - still running: it closed the connection
                code = None
            if code is None:
                reason = "the engine process closed its connection"
            elif code < 0:
                try:
                    sig = signal.Signals(-code).name
                except ValueError:
                    sig = f"signal {-code}"
                reason = f"the engine process was killed by {sig}" + (
                    " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else "")
            else:
                reason = f"the engine process exited with code {code}"
        self.close()
        raise EngineFailure(f"{reason}, during {waiting_for}")

    def close(self) -> None:
        """Kill the engine process (the next `begin` starts a fresh one)."""
        if self.ep is not None:
            self.ep.dead = True
            try:
                self.ep.conn.close()
            except OSError:
                pass
        if self.proc is not None:
            try:  # the whole session: workers the engine started go too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(5)
        self.ep, self.proc, self._adapter = None, None, None


class EngineProxy:
    """The adapter as the checks see it. Hooks are forwarded to the engine process; the outputs
    of `generate` are checked here, in the parent, against the request list."""

    def __init__(self, handle: Proxy):
        object.__setattr__(self, "_handle", handle)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._handle, name)

    def generate(self, prompts, params=None):
        outs = self._handle.generate(prompts, params)
        check_outputs(prompts, params, outs)
        return outs

    def __repr__(self) -> str:
        return f"<adapter {self._handle._tname} in the engine process>"


def check_outputs(prompts, params, outs) -> None:
    """Exactly one RequestOutput per request, in order, each for its request's prompt, with n
    completions. Raises AssertionError (never ValueError: that is a rejection of bad input)."""
    from ref.outputs import CompletionOutput, RequestOutput
    from ref.sampling_params import SamplingParams

    prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    if params is None or isinstance(params, SamplingParams):
        params_list = [params or SamplingParams()] * len(prompt_list)
    else:
        params_list = list(params)
    if not isinstance(outs, list):
        raise AssertionError(f"generate returned {type(outs).__name__}, not a list of RequestOutput")
    if len(outs) != len(prompt_list):
        raise AssertionError(f"generate returned {len(outs)} outputs for {len(prompt_list)} requests")
    for i, (prompt, p, out) in enumerate(zip(prompt_list, params_list, outs)):
        if not isinstance(out, RequestOutput):
            raise AssertionError(f"output {i} is a {type(out).__name__}, not a RequestOutput: {str(out)[:200]}")
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            if out.prompt_token_ids != list(prompt["prompt_token_ids"]):
                raise AssertionError(f"output {i} is not for request {i}: prompt_token_ids "
                                     f"{str(out.prompt_token_ids)[:120]} vs {str(prompt['prompt_token_ids'])[:120]}")
        elif isinstance(prompt, str) and out.prompt != prompt:
            raise AssertionError(f"output {i} is not for request {i}: prompt {out.prompt!r:.120} vs {prompt!r:.120}")
        n = p.n if isinstance(p, SamplingParams) else 1
        if not isinstance(out.outputs, list) or len(out.outputs) != n:
            got = len(out.outputs) if isinstance(out.outputs, list) else repr(out.outputs)
            raise AssertionError(f"output {i} has {got} completions, request asked for n={n}")
        for c in out.outputs:
            if not (isinstance(c, CompletionOutput) and isinstance(c.token_ids, list)
                    and all(type(t) is int for t in c.token_ids) and isinstance(c.text, str)):
                raise AssertionError(f"output {i}: completion {str(c)[:200]} is not a CompletionOutput "
                                     "with int token_ids and str text")
