"""Runtime: applying tasks to the shared backbone (executor, ONNX backend), batching (engine),
the gRPC server and its client. Imports core, never trainers."""
