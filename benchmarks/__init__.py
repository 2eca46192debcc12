"""Benchmarks: system benchmarks (system/), research studies (studies/), what they share
(common.py) and the renderer of their results into the docs (results.py)."""
