"""System benchmarks: serving speed, memory, the chaos run, kernels, the GPU check."""
