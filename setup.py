"""Build step: compile protos/ into the package's gRPC modules (ticketserve/v1/, ticketserve/openinference/) before
the package is built or installed (editable installs too), so nothing is generated at run time.
Everything else about the package is in pyproject.toml."""

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
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
