"""Build step: compile protos/ into the package's gRPC modules (ticketserve/v1/, ticketserve/openinference/) before
the package is built or installed (editable installs too), so nothing is generated at run time, and record
which tools generated them (ticketserve/_built_with.json: what `ticketserve` checks its runtime against at
import, and what the install test compares with the lock). Everything else about the package is in
pyproject.toml."""

import json
import re
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ["ticketserve/v1/ticketserve.proto", "ticketserve/openinference/grpc_predict_v2.proto"]
# The Open Inference Protocol's messages are named `inference.*` by every implementation: Triton's
# client (tritonclient) and KServe's SDK register the same names in protobuf's default pool, and
# a second registration there fails. Ours go into a pool of their own, so a process may hold
# both (a test, a benchmark, a user's program that embeds the server and calls another one).
PRIVATE_POOL = {"ticketserve/openinference/grpc_predict_v2_pb2.py"}
BUILT_WITH = ROOT / "ticketserve" / "_built_with.json"
BUILD_TOOLS = ("grpcio-tools", "grpcio", "protobuf", "setuptools")
# the oldest runtimes the generated code accepts: it raises at import below them
GRPC_FLOOR = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'$", re.M)
PROTOBUF_FLOOR = re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),")


def generated_floors() -> dict[str, str]:
    """What the generated modules demand of grpcio and protobuf, read from the modules themselves."""
    floors = set()
    for proto in PROTOS:
        stem = ROOT / proto.removesuffix(".proto")
        grpc = GRPC_FLOOR.search(Path(f"{stem}_pb2_grpc.py").read_text())
        protobuf = PROTOBUF_FLOOR.search(Path(f"{stem}_pb2.py").read_text())
        if not grpc or not protobuf:
            raise RuntimeError(f"{proto}: protoc's output changed; cannot read the runtime versions it needs")
        floors.add((grpc[1], ".".join(protobuf.groups())))
    if len(floors) != 1:
        raise RuntimeError(f"the generated modules disagree on the runtimes they need: {sorted(floors)}")
    (grpc, protobuf), = floors
    return {"grpcio": grpc, "protobuf": protobuf}


class BuildPyWithProtos(build_py):
    def run(self):
        from grpc_tools import protoc

        well_known = files("grpc_tools") / "_proto"
        for proto in PROTOS:
            status = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}",
                                  f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", proto])
            if status != 0:
                raise RuntimeError(f"grpcio-tools failed to compile protos/{proto} (exit {status})")
        for module in PRIVATE_POOL:
            path = ROOT / module
            code = path.read_text()
            if "_descriptor_pool.Default().AddSerializedFile(" not in code:
                raise RuntimeError(f"{module}: protoc's output changed; cannot give it a private descriptor pool")
            path.write_text(code.replace("_descriptor_pool.Default().AddSerializedFile(",
                                         "_descriptor_pool.DescriptorPool().AddSerializedFile("))
        built_with = {"build_environment": {tool: metadata.version(tool) for tool in BUILD_TOOLS},
                      "runtime_floors": generated_floors()}
        BUILT_WITH.write_text(json.dumps(built_with, indent=1) + "\n")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
