"""Experiments over many configurations: benchmark sweeps (`sweep`) and the accuracy proxies (`proxy`)."""
