"""Which exec tasks a worker runs (``Register.exec`` / ``exec_allow``), and
the one matching rule, the same as ``weft-node``'s (``proto/src/exec_policy.rs``).

An allow-list entry is a bare name (no ``/``: matches only an ``argv[0]``
spelled exactly so, looked up in the worker's ``PATH``) or an absolute path
(matches only that exact ``argv[0]``). Nothing is resolved: ``python3`` does
not allow ``/usr/bin/python3``. An allow-list also refuses a task whose
``env`` or ``secret_env`` sets ``LD_*``, ``DYLD_*`` or another variable that
makes the loader or libc load other code (see :func:`loader_variable`), and
``PATH`` when ``argv[0]`` is a bare name (that ``PATH`` would choose the
file). Both maps count: ``secret_env`` is applied after ``env``.

Plain state, no I/O.
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, Mapping, Optional, Tuple, Union

from .._proto import common_pb2, node_pb2

#: What ``Worker(exec=...)`` takes: "allow", "deny", the programs allowed,
#: or an :class:`ExecPolicy`.
ExecSetting = Union[str, Iterable[str], "ExecPolicy", None]

MAX_EXEC_ALLOW = 1024
MAX_EXEC_ALLOW_LEN = 4096

#: Besides every ``LD_*`` and ``DYLD_*``: glibc's list of variables it drops
#: for set-user-id programs, less ``TMPDIR`` (the same list as weft-node's).
LOADER_VARIABLES = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR",
})


def loader_variable(program: str, name: str) -> bool:
    """True when a task running ``program`` (its ``argv[0]``) may not set
    ``name`` on an allow-list worker."""
    return (
        name.startswith("LD_")
        or name.startswith("DYLD_")
        or name in LOADER_VARIABLES
        or (name == "PATH" and "/" not in program)
    )


def _unsafe_env(program: str, field: str, name: str) -> str:
    if name == "PATH":
        return f"this worker runs {program!r} only from its own PATH; the task sets PATH in {field}"
    return (
        f"this worker's exec allow-list refuses tasks that set {name[:80]} (in {field}): "
        f"it would change which code {program!r} loads"
    )


class ExecPolicy:
    """``allow`` (any program), ``deny`` (none) or an allow-list of programs."""

    def __init__(self, setting: ExecSetting = "deny"):
        self.programs: Optional[FrozenSet[str]] = None
        if isinstance(setting, ExecPolicy):
            self.mode, self.programs = setting.mode, setting.programs
        elif setting is None or setting == "deny":
            self.mode = "deny"
        elif setting == "allow":
            self.mode = "allow"
        elif isinstance(setting, (str, bytes)):
            raise ValueError(f"exec must be 'allow', 'deny' or a list of programs, not {setting!r}")
        else:
            programs = frozenset(setting)
            for program in programs:
                _check_entry(program)
            if not programs:
                raise ValueError("an exec allow-list names at least one program (use exec='deny' for none)")
            if len(programs) > MAX_EXEC_ALLOW:
                raise ValueError(f"an exec allow-list names at most {MAX_EXEC_ALLOW} programs")
            self.mode = "list"
            self.programs = programs

    def register_fields(self) -> Tuple[int, list]:
        """``(Register.exec, Register.exec_allow)`` declaring this policy."""
        if self.mode == "allow":
            return node_pb2.EXEC_POLICY_ALLOW, []
        if self.mode == "deny":
            return node_pb2.EXEC_POLICY_DENY, []
        return node_pb2.EXEC_POLICY_ALLOW_LIST, sorted(self.programs or ())

    def refusal(
        self, exec_spec: common_pb2.ExecSpec, secret_env: Optional[Mapping[str, str]] = None
    ) -> Optional[str]:
        """Why this worker refuses to run ``exec_spec`` (whose task has
        ``secret_env``), or None when it runs it."""
        program = exec_spec.argv[0] if exec_spec.argv else ""
        if self.mode == "allow":
            return None
        if self.mode == "deny":
            return "this worker does not run exec tasks (its exec policy is deny)"
        programs = self.programs or frozenset()
        if program not in programs:
            return f"this worker does not run program {program!r} (its exec allow-list: {', '.join(sorted(programs))})"
        for field, names in (("env", exec_spec.env), ("secret_env", secret_env or {})):
            for name in sorted(names):
                if loader_variable(program, name):
                    return _unsafe_env(program, field, name)
        return None

    def __repr__(self) -> str:
        return f"ExecPolicy({self.mode if self.programs is None else sorted(self.programs)!r})"


def _check_entry(program: str) -> None:
    if not isinstance(program, str) or not program:
        raise ValueError(f"exec allow-list: a program is a non-empty string, not {program!r}")
    if len(program.encode()) > MAX_EXEC_ALLOW_LEN or "\0" in program:
        raise ValueError(f"exec allow-list: bad program {program[:80]!r}")
    if "/" in program and not program.startswith("/"):
        raise ValueError(f"exec allow-list: {program!r} is a relative path; use a bare name or an absolute path")


def from_flags(exec_mode: Optional[str], exec_allow: Optional[Iterable[str]]) -> ExecPolicy:
    """The policy of the ``--exec allow|deny`` / ``--exec-allow PROGRAM`` flags
    (as ``weft-node`` takes them; comma-separated lists work too)."""
    programs = [p for item in (exec_allow or []) for p in item.split(",") if p]
    if programs:
        if exec_mode is not None:
            raise ValueError("--exec and --exec-allow cannot be used together")
        return ExecPolicy(programs)
    return ExecPolicy(exec_mode or "deny")
