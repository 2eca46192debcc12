"""The gRPC server: loader (when tasks load), service (proto ↔ engine), auth, metrics, main."""
