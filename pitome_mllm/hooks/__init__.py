"""Insertion points on generic modules, each reversible: vision-encoder layer overrides
(`tower`), the projector stage (`projector`), proportional attention in the language model
(`llm_attention`), and the observers that watch them (`observers`). Nothing here knows a
model family; the adapters in `pitome_mllm.models` say which modules to hook."""
