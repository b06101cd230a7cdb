"""Helpers that only the test suite and the benchmarks use (never imported by the shipped
commands): running tiny models through vLLM's engine. The models themselves are in
`pitome_mllm.zoo`."""
