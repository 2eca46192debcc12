"""Research studies: the methods reproduced at MiniLM scale, and quality under reduced precision."""
