"""Plumbing every outer module may use: the cache folder, atomic file writes, prompt building.

The lowest layer of the outer ring: it imports nothing of the package above the core, so
runtime, tools, integrations, experiments and the CLI can all share it without cycles.
"""
