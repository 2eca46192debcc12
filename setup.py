"""Build step: compile protos/ into the package's gRPC modules (ticketserve/v1/*_pb2*.py) before
the package is built or installed (editable installs too), so nothing is generated at run time.
Everything else about the package is in pyproject.toml."""

from importlib.resources import files
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ["ticketserve/v1/ticketserve.proto"]


class BuildPyWithProtos(build_py):
    def run(self):
        from grpc_tools import protoc

        well_known = files("grpc_tools") / "_proto"
        for proto in PROTOS:
            status = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}",
                                  f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", proto])
            if status != 0:
                raise RuntimeError(f"grpcio-tools failed to compile protos/{proto} (exit {status})")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
