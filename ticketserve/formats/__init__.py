"""Artifacts to and from other tools' formats (PEFT adapters)."""
