"""A task's parents: the final results of the tasks it runs after
(``Assignment.parents``, in the order of its spec's ``after``), as a handler
reads them (``ctx.parents``) and as an exec process finds them on disk.

The counterpart of the Rust node's parents files (``proto/README.md``
"Dependencies"): an exec task gets ``$WEFT_PARENTS``, a private directory
holding one file per parent, named by its ref (or its id when it has none),
with the parent's output, and ``index.json`` listing ``{task_id, ref, state,
file}`` in ``after`` order; and ``$WEFT_OUTPUT``, a path it may write its
result to, read when it exits (however it ended, unless stopped) as the
task's output (at most :data:`OUTPUT_FILE_LIMIT` bytes; a larger file
fails the attempt, saying so). The directory goes with the attempt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from .._proto import common_pb2

#: Most bytes of ``$WEFT_OUTPUT`` taken as an exec task's output: as weft-node, the largest
#: message a coordinator may take (64 MiB) less the envelope; the outbox then fails a result
#: too large for the coordinator it has (``fit``).
OUTPUT_FILE_LIMIT = 64 * 1024 * 1024 - 1024
#: The index file in ``$WEFT_PARENTS``.
INDEX = "index.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True)
class ParentResult:
    """One parent's final result: ``state`` is the lower-case state (``"succeeded"``,
    ``"failed"``, ...), ``output`` its output bytes (a call's return value, an exec task's
    ``$WEFT_OUTPUT``)."""

    task_id: str
    ref: str
    state: str
    output: bytes

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    def json(self) -> Any:
        """The output decoded from JSON."""
        return json.loads(self.output)

    def text(self) -> str:
        """The output as UTF-8 text."""
        return self.output.decode()


def state_name(state: int) -> str:
    """``TASK_STATE_UPSTREAM_FAILED`` -> ``"upstream_failed"``."""
    if state in common_pb2.TaskState.values():
        return common_pb2.TaskState.Name(state)[len("TASK_STATE_"):].lower()
    return "unspecified"


def parents_of(assignment) -> List[ParentResult]:
    """The parents an ``Assignment`` carries, in ``after`` order."""
    return [ParentResult(p.task_id, p.ref, state_name(p.state), bytes(p.output)) for p in assignment.parents]


class _Names:
    """The parents' file names of one attempt, given out in order: a name taken by an earlier
    parent gets ``.2``, ``.3``, ... (the first free), as weft-node names them. Each base's search
    goes on from the suffix after the one it last gave (those passed were taken, and names are
    never given back), so many parents of one ref take O(n) tries, not O(n**2)."""

    def __init__(self):
        self.taken: set = set()
        self.next: dict = {}
        #: Names tried so far (tests).
        self.probes = 0

    def name(self, parent: ParentResult) -> str:
        name = parent.ref or parent.task_id
        if not _SAFE_NAME.fullmatch(name) or name in (".", "..", INDEX):
            name = parent.task_id if _SAFE_NAME.fullmatch(parent.task_id) else "parent"
        base = name
        self.probes += 1
        if name in self.taken or name == INDEX:
            n = self.next.get(base, 2)
            while True:
                self.probes += 1
                name = f"{base}.{n}"
                if name not in self.taken and name != INDEX:
                    break
                n += 1
            self.next[base] = n + 1
        self.taken.add(name)
        return name


class ExecFiles:
    """The ``$WEFT_PARENTS`` directory and ``$WEFT_OUTPUT`` path of one exec attempt."""

    def __init__(self, parents: Sequence[ParentResult]):
        self.root = tempfile.mkdtemp(prefix="weft-attempt-")
        try:
            self.parents_dir = os.path.join(self.root, "parents")
            os.mkdir(self.parents_dir, 0o700)
            index, names = [], _Names()
            for parent in parents:
                name = names.name(parent)
                with open(os.path.join(self.parents_dir, name), "wb") as f:
                    f.write(parent.output)
                index.append({"task_id": parent.task_id, "ref": parent.ref, "state": parent.state, "file": name})
            with open(os.path.join(self.parents_dir, INDEX), "w") as f:
                json.dump(index, f)
            self.output_path = os.path.join(self.root, "output")
        except BaseException:
            self.remove()
            raise

    def env(self) -> dict:
        """What the process gets in its environment."""
        return {"WEFT_PARENTS": self.parents_dir, "WEFT_OUTPUT": self.output_path}

    def output(self) -> Optional[bytes]:
        """What the process wrote to ``$WEFT_OUTPUT`` (None: nothing); ValueError beyond the limit."""
        try:
            size = os.path.getsize(self.output_path)
        except OSError:
            return None
        if size > OUTPUT_FILE_LIMIT:
            raise ValueError(f"the $WEFT_OUTPUT file is larger than {OUTPUT_FILE_LIMIT} bytes, the most a task's "
                             "output may be")
        with open(self.output_path, "rb") as f:
            return f.read()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
