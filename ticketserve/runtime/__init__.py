"""Runtime: applying tasks to the shared backbone (executor, with its torch or ONNX backend),
one tokenization (tokenizing), batching (engine), the server and its client. Imports core,
never trainers."""
