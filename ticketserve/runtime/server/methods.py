"""The gRPC methods the interceptors treat specially, named once."""

V2 = "/inference.GRPCInferenceService/"
# ours: counted while in flight, refused once the server drains
OWN_PREFIXES = ("/ticketserve.v1.", V2)
# probes: open without a token, answered while draining (readiness then says not ready)
PROBE_PREFIXES = ("/grpc.health.v1.Health/",)
PROBES = (f"{V2}ServerLive", f"{V2}ServerReady")
# admin calls: the admin token only
ADMIN = ("/ticketserve.v1.Tasks/LoadTask", "/ticketserve.v1.Tasks/UnloadTask",
         f"{V2}RepositoryModelLoad", f"{V2}RepositoryModelUnload")


def is_probe(method: str) -> bool:
    return method.startswith(PROBE_PREFIXES) or method in PROBES


def is_own(method: str) -> bool:
    return method.startswith(OWN_PREFIXES) and not is_probe(method)
