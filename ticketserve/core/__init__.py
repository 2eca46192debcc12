"""The artifact contract every layer above the registry shares: artifact kinds and their
apply functions, the backbone, task heads, tasks and their data, and the errors."""
