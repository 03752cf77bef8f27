"""Build hook: generate the weft.v1 gRPC stubs from the .proto files.

The stubs are never checked in or hand-edited. `build_py` runs
`grpc_tools.protoc` over `weft/v1/*.proto` and writes the modules into
`weft/_proto/`, rewriting the generated `from weft.v1 import x_pb2` lines into
package-relative imports (the proto package `weft.v1` would otherwise clash
with this Python package `weft`).

Where the .proto files are found, first hit wins:
  1. `$WEFT_PROTO_DIR` (the directory that contains `weft/v1/`),
  2. `../../proto` next to this file (a checkout of the Weft repository),
  3. `./proto` next to this file (an sdist, which bundles a copy).
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_FILES = ["common.proto", "node.proto", "task.proto", "admin.proto", "schedule.proto"]


def find_proto_root() -> Path:
    candidates = []
    env = os.environ.get("WEFT_PROTO_DIR")
    if env:
        candidates.append(Path(env))
    candidates += [HERE.parent.parent / "proto", HERE / "proto"]
    for root in candidates:
        if all((root / "weft" / "v1" / name).is_file() for name in PROTO_FILES):
            return root.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SystemExit(
        f"weft: cannot find weft/v1/*.proto (tried {tried}); "
        "set WEFT_PROTO_DIR to the directory that contains weft/v1/"
    )


def generate(out_dir: Path) -> None:
    """Generates the *_pb2.py / *_pb2_grpc.py / *_pb2.pyi modules into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    root = find_proto_root()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [str(root / "weft" / "v1" / name) for name in PROTO_FILES]
        if protoc.main(args) != 0:
            raise SystemExit("weft: grpc_tools.protoc failed on " + str(root))
        generated = Path(tmp) / "weft" / "v1"
        for src in sorted(generated.iterdir()):
            text = src.read_text()
            # `from weft.v1 import common_pb2 as ...` -> `from . import common_pb2 as ...`
            text = re.sub(r"^from weft\.v1 import ", "from . import ", text, flags=re.M)
            text = re.sub(r"^import weft\.v1\.(\w+)", r"from . import \1", text, flags=re.M)
            (out_dir / src.name).write_text(text)


class BuildPyWithProtos(build_py):
    """build_py that generates weft/_proto/ first."""

    def run(self):
        if self.editable_mode:
            generate(HERE / "weft" / "_proto")
        else:
            generate(Path(self.build_lib) / "weft" / "_proto")
        super().run()


class SdistWithProtos(sdist):
    """sdist that bundles the .proto files under ./proto, so it builds alone."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root = find_proto_root()
        dest = Path(base_dir) / "proto" / "weft" / "v1"
        dest.mkdir(parents=True, exist_ok=True)
        for name in PROTO_FILES:
            shutil.copy2(root / "weft" / "v1" / name, dest / name)


def runtime_requirements() -> list:
    """The generated code needs a runtime at least as new as its generator;
    a worker that joins makes its key and certificate requests with
    `cryptography`."""
    from importlib.metadata import version

    return [f"grpcio>={version('grpcio-tools')}", f"protobuf>={version('protobuf')}", "cryptography>=42"]


setup(install_requires=runtime_requirements(), cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
