"""Insertion points on generic modules, each a reversible `Hook` (`base`: ``install()`` / ``remove()``,
installed in order under one rollback and removed in reverse): vision-encoder layer overrides
(`tower`), the projector stage (`projector`), proportional attention in the language model
(`llm_attention`), the state they hand each other (`state`), and the observers that watch them
(`observers`). Nothing here knows a model family; the adapters in `pitome_mllm.models` say which
modules to hook and in which order."""
