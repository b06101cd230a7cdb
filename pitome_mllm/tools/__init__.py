"""Measure and show a patched model: profiling (latency, memory, FLOPs), merge maps, spectral distance."""
