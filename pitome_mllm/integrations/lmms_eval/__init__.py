"""lmms-eval model classes: ``pitome_llava_hf`` (`llava_hf`) and ``pitome_llava`` (`llava_original`).

lmms-eval finds them through the entry points in ``pitome_mllm.lmms_eval_manifest``."""
