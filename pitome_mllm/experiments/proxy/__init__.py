"""CPU proxy benchmarks on a real pretrained ViT (the DINOv2 tower of `pitome_mllm.zoo.real_tower`).

* `pitome_mllm.experiments.proxy.fidelity`: how much of the tower's features each token-reduction method keeps
  (linear probe, pooled and per-patch cosine, spectral distance); its parts are `images` (the data),
  `fidelity_settings` (settings and their token budgets), `features` (one setting's tokens, summarised),
  `scoring` (probe and scores) and `fidelity_table` (its files).
* `pitome_mllm.experiments.proxy.easy_vqa` (the data), `mini_llava` (a mini-LLaVA on that tower, trained here),
  `vqa` (every method and budget as a sweep) and `vqa_report` (its tables): easy-VQA questions answered
  with every method and budget.
* `pitome_mllm.experiments.proxy.stats`, `pitome_mllm.experiments.proxy.report`,
  `pitome_mllm.experiments.proxy.recommend`: both proxies over several seeds, paired differences to the
  reference PiToMe with crossed seeds x items standard errors, and the method to use at each budget.
* `settings` (the settings both proxies run), `files` (atomic writes, caches, seed folders) and `plots`
  serve them all.
"""
