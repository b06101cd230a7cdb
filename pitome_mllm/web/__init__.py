"""``pitome-mllm web``: a browser page that compares the unpatched and the patched model on one image.

`session` holds everything the page does without a web framework (checking uploads, planning a
setting, streaming both answers with their costs, drawing the merge map), `openai_client` talks to a
running ``pitome-mllm serve``, and `app` lays the page out with Gradio (the optional ``[web]`` extra).
"""
