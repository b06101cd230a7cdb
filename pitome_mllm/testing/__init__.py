"""Models built at test time: tiny random LLaVA models, real architectures with random weights,
and a CLIP tower with real (DINOv2) weights. Model-specific construction lives here and in
`pitome_mllm.models` only."""
