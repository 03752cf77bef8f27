"""The built-in handler behind :class:`weft.Executor`: call a pickled
module-level Python function, with pickled arguments, and answer the pickled
result.

A worker serves it (as :data:`HANDLER`) only when told which modules it may
import: ``weft.Worker(allow_modules=["mypkg", "math"])`` or
``weft-py-worker --allow-module mypkg``. Unpickling goes through
:class:`RestrictedUnpickler`, whose ``find_class`` refuses every global
outside those modules (and their submodules) and a small set of harmless
types that ordinary arguments need (:data:`SAFE_GLOBALS`), so a payload
naming ``os.system`` fails the task before anything runs. What this allows is
exactly: a submitter may call any function of an allowed module with any
arguments it can build from allowed globals. Never allow modules with
dangerous functions (``os``, ``subprocess``, ``builtins``, ``pickle``,
``importlib``, ...).

The handler is an ordinary ``process``-kind handler (by default) whose
function is the module-level :func:`run_pickled` bound to the allowed list
with ``functools.partial``, so it runs over whatever pool the worker has; it
knows nothing of attempts or streams. The wire format is shared with the
client side (``weft/executor.py``):

- input: ``pickle.dumps((FORMAT, "call", fn, args, kwargs))`` or
  ``pickle.dumps((FORMAT, "chunk", fn, [args, ...]))`` (one call per args
  tuple, as ``Executor.map(..., chunksize=k)`` sends);
- output: ``pickle.dumps(result)`` (a list of results for a chunk);
- the function raised: the attempt fails with ``Type: message``, the
  traceback, and a last line :data:`EXCEPTION_MARKER` + the base64 of the
  pickled exception (left out when it does not pickle or is too large);
- a refused global or a malformed payload: the attempt fails to start (not
  retried), naming the module and how to allow it.

Futures as arguments: the client puts a :class:`Parent` marker (the index of
a task in the spec's ``after``, and the codec of its result) where it was
given a future (an argument, a keyword argument, or an item of a list,
tuple or dict passed as one). The worker hands this handler, when the task
has parents, :func:`with_parents`'s envelope: :data:`PARENTS_PREFIX`, then
the pickle of ``([(task_id, ref, state, output), ...], payload)``; each
marker is replaced by its parent's result, decoded with its codec
(``"pickle"``: unpickled under the same restrictions, ``"json"``,
``"bytes"``), before the call.
"""

from __future__ import annotations

import base64
import functools
import importlib
import inspect
import io
import pickle
import traceback
import types
from typing import Any, Dict, Iterable, Sequence, Tuple

from .handlers import HandlerError, StartFailed, with_traceback

#: The reserved handler name a worker serves pickled calls as.
HANDLER = "weft.pickle"
#: Version of the payload; a worker refuses another one.
FORMAT = 1
#: Starts the line of a failed attempt's error that carries the pickled exception.
EXCEPTION_MARKER = "weft-exception-pickle: "
#: Most bytes of a pickled exception carried in an error (the coordinator keeps 64 KiB of it).
EXCEPTION_LIMIT = 24 * 1024
#: Most characters of an exception's message kept in the error's first line.
SUMMARY_LIMIT = 8 * 1024

#: Most globals a process keeps found (the names come from submitters).
FOUND_LIMIT = 1024

#: Globals any payload may name: harmless types that ordinary arguments are built from.
SAFE_GLOBALS = frozenset(
    [("builtins", name) for name in (
        "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "range", "set",
        "slice", "str", "tuple",
    )]
    + [("collections", name) for name in ("OrderedDict", "deque", "Counter", "defaultdict")]
    + [("datetime", name) for name in ("date", "time", "datetime", "timedelta", "timezone")]
    + [("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID")]
    + [("weft.worker.pickled", "Parent")]
)
#: Starts the input of a call whose parents' results come with it (never a pickle's first byte).
PARENTS_PREFIX = b"\x00weft-parents\x00"
#: How a parent's result is decoded: as weft.Executor reads a result of that kind.
PARENT_CODECS = ("pickle", "json", "bytes")


class Parent:
    """Stands, in a pickled call's arguments, for the result of the task at ``index`` in its
    ``after`` (decoded with ``codec``, one of :data:`PARENT_CODECS`)."""

    __slots__ = ("index", "codec")

    def __init__(self, index: int, codec: str):
        self.index = index
        self.codec = codec

    def __reduce__(self):
        return (Parent, (self.index, self.codec))

    def __repr__(self) -> str:
        return f"Parent({self.index}, {self.codec!r})"


def with_parents(parents: Sequence[Any], data: bytes) -> bytes:
    """The input of a pickled call with its parents' results (``ParentResult``\\ s) in front."""
    rows = [(p.task_id, p.ref, p.state, bytes(p.output)) for p in parents]
    return PARENTS_PREFIX + pickle.dumps((rows, bytes(data)), protocol=pickle.HIGHEST_PROTOCOL)


def _split_parents(data: bytes) -> Tuple[list, bytes]:
    """``(parents rows, payload)`` of an input; no rows for a plain one."""
    if not data.startswith(PARENTS_PREFIX):
        return [], data
    try:
        rows, payload = loads(data[len(PARENTS_PREFIX):], ())
        rows = [tuple(row) for row in rows]
        if not isinstance(payload, bytes) or any(len(row) != 4 for row in rows):
            raise ValueError("bad envelope")
    except StartFailed:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed envelope is refused like a malformed payload
        raise StartFailed(f"{HANDLER}: malformed parents envelope ({type(e).__name__}: {e})") from None
    return rows, payload


def _resolve(value: Any, rows: list, allowed: Tuple[str, ...]) -> Any:
    if not isinstance(value, Parent):
        return value
    if not isinstance(value.index, int) or not 0 <= value.index < len(rows):
        raise StartFailed(f"{HANDLER}: an argument names parent {value.index!r}, and the task has {len(rows)}")
    task_id, ref, state, output = rows[value.index]
    if state != "succeeded":
        raise HandlerError(f"the task {task_id} passed as an argument ended {state}: it has no result to pass")
    if value.codec == "pickle":
        try:
            return loads(output, allowed)
        except StartFailed:
            raise
        except Exception as e:  # noqa: BLE001
            raise StartFailed(f"{HANDLER}: the result of task {task_id} does not unpickle: {e}") from None
    if value.codec == "json":
        import json

        return json.loads(output) if output else None
    return bytes(output)


def _substitute(value: Any, rows: list, allowed: Tuple[str, ...]) -> Any:
    """``value`` with its :class:`Parent` markers replaced: itself, or one level inside a list,
    tuple or dict."""
    if isinstance(value, Parent):
        return _resolve(value, rows, allowed)
    if type(value) in (list, tuple):
        return type(value)(_resolve(item, rows, allowed) for item in value)
    if type(value) is dict:
        return {key: _resolve(item, rows, allowed) for key, item in value.items()}
    return value


#: Modules never allowed (``allow_modules`` refuses them): calling their functions with
#: arguments chosen by a submitter runs commands, opens files or loads code.
NEVER_ALLOWED = frozenset([
    "builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "pathlib", "io", "_io", "socket", "signal",
    "pickle", "_pickle", "marshal", "importlib", "ctypes", "runpy", "code", "codeop", "pty", "multiprocessing",
    "weft",
])


def allowed(module: str, allow_modules: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``allow_modules`` or a submodule of one."""
    return any(module == m or module.startswith(m + ".") for m in allow_modules)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only globals of the allowed modules (and :data:`SAFE_GLOBALS`).

    A dotted name (``Class.method``) is followed one attribute at a time and
    refused if it passes through a module (``mypkg.os.system``), a dunder
    attribute (``f.__globals__``) or anything defined outside the allowed
    modules (``mypkg.run`` after ``from subprocess import run`` in
    ``mypkg``: see :func:`home`), so an allowed module cannot be used as a
    door to the modules it imports or what it imports from them.
    """

    #: Globals found already, by (allowed modules, module, name): a pool
    #: process unpickles the same function for every call it runs.
    _found: Dict[Tuple[Tuple[str, ...], str, str], Any] = {}

    def __init__(self, file, allow_modules: Sequence[str]):
        super().__init__(file)
        self.allow_modules = tuple(allow_modules)

    def find_class(self, module: str, name: str) -> Any:
        key = (self.allow_modules, module, name)
        found = self._found.get(key)
        if found is None:
            found = self._find_class(module, name)
            if len(self._found) < FOUND_LIMIT:
                self._found[key] = found
        return found

    def _find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        if not allowed(module, self.allow_modules):
            raise StartFailed(refusal(module, name))
        parts = name.split(".")
        if any(not part or part.startswith("__") for part in parts):
            raise StartFailed(f"{HANDLER}: global '{module}.{name}' refused: dunder attributes are never allowed")
        obj: Any = importlib.import_module(module)
        for part in parts:
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise StartFailed(f"{HANDLER}: module '{module}' has no attribute '{name}' on this worker") from None
            if isinstance(obj, types.ModuleType):
                raise StartFailed(f"{HANDLER}: global '{module}.{name}' refused: it names a module, reached through "
                              f"'{module}'; allow that module itself")
            where = home(obj, module)
            if where is None or not allowed(where, self.allow_modules):
                raise StartFailed(f"{HANDLER}: global '{module}.{name}' refused: '{part}' is defined in "
                                  f"{where or 'no module'}, not in an allowed module (imported into '{module}')")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise StartFailed(f"{HANDLER}: persistent ids are not allowed")


_MISSING = object()


def home(obj: Any, through: str = "") -> Any:
    """The name of the module ``obj`` was defined in, as far as it tells; None when it does not
    say (an instance of a built-in type, a C method bound to an object).

    ``through``: the module the name was reached through. An object that says nothing of its
    module (``__module__``: numpy's ufuncs before numpy 2.2) counts as its type's module's when
    that is the package it was reached through (``numpy.add``): an instance of a package's
    own type, not one imported into an allowed module from elsewhere."""
    objclass = getattr(obj, "__objclass__", None)
    if isinstance(objclass, type):  # a C method or slot of a class (``str.join``)
        return objclass.__module__
    if isinstance(obj, types.BuiltinFunctionType):
        owner = obj.__self__
        if isinstance(owner, types.ModuleType):  # a C function: the module it is bound to (``math.factorial``)
            return owner.__name__
        if isinstance(owner, type):  # a C class method (``dict.fromkeys``)
            return owner.__module__
        if owner is not None:
            return None  # a C method of an object
        # A C function bound to nothing (Cython's with binding=False): its ``__module__``,
        # what pickle itself writes for it.
    if isinstance(obj, types.MethodType):  # a Python method bound to its class or an object
        return home(obj.__func__)
    try:
        module = obj.__module__
    except AttributeError:
        if inspect.getattr_static(obj, "__module__", _MISSING) is not _MISSING:
            return None  # it has one, and hides it (a proxy forwarding to what has none): it says nothing
        kind = getattr(type(obj), "__module__", None)
        if isinstance(kind, str) and through and kind.split(".")[0] == through.split(".")[0]:
            return kind
        return None
    return module if isinstance(module, str) else None


def refusal(module: str, name: str) -> str:
    """The error of a task naming a global of a module this worker does not allow."""
    top = module.split(".")[0]
    if top in NEVER_ALLOWED:
        return (f"{HANDLER}: module '{module}' is not allowed on this worker (global '{module}.{name}'), and never "
                "can be: its functions are unsafe to call with any arguments")
    return (f"{HANDLER}: module '{module}' is not allowed on this worker (global '{module}.{name}'); "
            f"allow it with `weft-py-worker --allow-module {top}` or Worker(allow_modules=[..., '{top}']), "
            "and only if every function in it is safe to call with any arguments")


def loads(data: bytes, allow_modules: Sequence[str]) -> Any:
    """Unpickles ``data`` allowing only globals of ``allow_modules`` and :data:`SAFE_GLOBALS`."""
    return RestrictedUnpickler(io.BytesIO(data), allow_modules).load()


def run_pickled(data: bytes, *, allowed: Tuple[str, ...]) -> bytes:
    """The handler: unpickle ``data`` (restricted to ``allowed``), call, answer the pickled result.

    Bind ``allowed`` with ``functools.partial`` to register it; it is a
    module-level function so that the partial pickles into a process pool.
    """
    rows, data = _split_parents(data)
    try:
        payload = loads(data, allowed)
    except StartFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed payload is refused the same way
        raise StartFailed(f"{HANDLER}: the input is not a payload of weft.Executor ({type(e).__name__}: {e})") from None
    if not (isinstance(payload, tuple) and len(payload) >= 3 and payload[0] == FORMAT and callable(payload[2])):
        version = payload[0] if isinstance(payload, tuple) and payload else None
        raise StartFailed(f"{HANDLER}: the input is not a payload of weft.Executor of format {FORMAT} "
                          f"(format {version!r}): client and worker need compatible weft versions")
    form, fn = payload[1], payload[2]
    if form == "call" and len(payload) == 5 and rows:
        payload = payload[:3] + (
            tuple(_substitute(a, rows, allowed) for a in payload[3]),
            {k: _substitute(v, rows, allowed) for k, v in payload[4].items()},
        )
    try:
        if form == "call" and len(payload) == 5:
            result: Any = fn(*payload[3], **payload[4])
        elif form == "chunk" and len(payload) == 4:
            result = [fn(*args) for args in payload[3]]
        else:
            raise StartFailed(f"{HANDLER}: unknown payload form {form!r}")
    except StartFailed:
        raise
    except Exception as e:  # noqa: BLE001 - the function's failure is the task's
        raise HandlerError(failure_text(e)) from None
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def failure_text(e: BaseException) -> str:
    """A failed call's error: ``Type: message``, the traceback and the pickled exception's line."""
    message = str(e)
    if len(message) > SUMMARY_LIMIT:
        message = message[:SUMMARY_LIMIT] + "... (cut)"
    name = type(e).__qualname__
    module = type(e).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    summary = f"{name}: {message}" if message else name
    trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    text = with_traceback(summary, trace)
    try:
        pickled = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is carried as text only
        return text
    if len(pickled) > EXCEPTION_LIMIT:
        return text
    return f"{text}\n\n{EXCEPTION_MARKER}{base64.b64encode(pickled).decode()}"


def handler(allow_modules: Sequence[str]) -> functools.partial:
    """:func:`run_pickled` bound to ``allow_modules`` (checked: names of modules, not empty)."""
    if isinstance(allow_modules, str):
        raise TypeError("allow_modules is a list of module names, e.g. ['mypkg', 'math']")
    modules = tuple(dict.fromkeys(str(m).strip() for m in allow_modules))
    if not modules:
        raise ValueError("allow_modules must name at least one module")
    for module in modules:
        if not module or not all(part.isidentifier() for part in module.split(".")):
            raise ValueError(f"allow_modules: {module!r} is not a module name")
        if module.split(".")[0] in NEVER_ALLOWED:
            raise ValueError(f"allow_modules: '{module}' is never allowed: anyone who may submit could call its "
                             "functions with any arguments (commands, files, code)")
    return functools.partial(run_pickled, allowed=modules)
