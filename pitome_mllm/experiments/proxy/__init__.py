"""CPU proxy benchmarks on a real pretrained ViT (the DINOv2 tower of `pitome_mllm.zoo.real_tower`).

* `pitome_mllm.experiments.proxy.fidelity`: how much of the tower's features each token-reduction method keeps
  (linear probe, pooled and per-patch cosine, spectral distance).
* `pitome_mllm.experiments.proxy.easy_vqa` / `pitome_mllm.experiments.proxy.vqa`: a mini-LLaVA on that tower answering
  easy-VQA questions with every method and budget.
* `pitome_mllm.experiments.proxy.stats`, `pitome_mllm.experiments.proxy.report`,
  `pitome_mllm.experiments.proxy.recommend`: both proxies over several seeds, paired differences to the
  reference PiToMe with crossed seeds x items standard errors, and the method to use at each budget.
"""
