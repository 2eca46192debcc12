"""gRPC code for the Open Inference Protocol (KServe v2), compiled from
protos/ticketserve/openinference/grpc_predict_v2.proto when the package is built or installed
(setup.py) — never edited by hand, never committed."""

try:
    from ticketserve.openinference import grpc_predict_v2_pb2 as pb
    from ticketserve.openinference import grpc_predict_v2_pb2_grpc as rpc
except ImportError as exc:  # a source checkout that was never installed
    raise ImportError("the gRPC code of ticketserve.openinference is built at install time: run `pip install -e .` "
                      "(or `make install`) in the source tree") from exc

__all__ = ["pb", "rpc"]
