"""Models the package builds for its own commands and tests: tiny random LLaVA models (the offline
demo, `serve tiny`), real architectures with random weights (`profile --arch`), and a CLIP tower
with real (DINOv2) weights (the proxy benchmarks). Model-specific construction lives here and in
`pitome_mllm.models` only."""
