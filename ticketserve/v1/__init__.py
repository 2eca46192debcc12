"""gRPC code for the ticketserve.v1 API, compiled from protos/ticketserve/v1/ticketserve.proto
when the package is built or installed (setup.py) — never edited by hand, never committed."""

try:
    from ticketserve.v1 import ticketserve_pb2 as pb
    from ticketserve.v1 import ticketserve_pb2_grpc as rpc
except ImportError as exc:  # a source checkout that was never installed
    raise ImportError("the gRPC code of ticketserve.v1 is built at install time: run `pip install -e .` "
                      "(or `make install`) in the source tree") from exc

TASK_HEADER = "x-ticketserve-task"  # the request header (gRPC metadata key) naming the task: balancers hash on it

__all__ = ["TASK_HEADER", "pb", "rpc"]
