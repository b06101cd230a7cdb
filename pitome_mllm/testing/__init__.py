"""Helpers that only the test suite and the benchmarks use (never imported by the shipped
commands): the checks the tests run on transformers LLaVA models (`llava`), running tiny
models through vLLM's engine (`vllm_runs`) and importing the benchmark scripts (`scripts`).
The models themselves are in `pitome_mllm.zoo`."""
