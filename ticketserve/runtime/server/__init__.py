"""The server: one request path (predictor) behind its doors — gRPC (service, openinference_grpc),
HTTP (http and its bodies, tensors and door) — with the loader (when tasks load), auth, metrics
and main."""
