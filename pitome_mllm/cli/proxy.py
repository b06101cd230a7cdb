"""``pitome-mllm proxy fidelity|vqa``: the CPU proxy benchmarks on a real pretrained tower.

* ``fidelity``: how much of the DINOv2 tower's features each method keeps (linear probe,
  cosines, spectral distance); `pitome_mllm.experiments.proxy.fidelity`.
* ``vqa``: a mini-LLaVA with that tower, trained on unmerged tokens, answering easy-VQA questions
  through lmms-eval with every method and budget; `pitome_mllm.experiments.proxy.vqa`.

Both need the proxy extra: ``pip install -e '.[proxy]'`` (and, for Fashion-MNIST, the Debian
package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import importlib

HELP = "CPU proxy benchmarks on a real pretrained ViT: feature fidelity and a mini-LLaVA on easy-VQA"
# proxy subcommand -> module with HELP, add_arguments(parser) and run(args)
PROXIES = {
    "fidelity": "pitome_mllm.experiments.proxy.fidelity",
    "vqa": "pitome_mllm.experiments.proxy.vqa",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="proxy", metavar="PROXY", required=True)
    for name, module_name in PROXIES.items():
        module = importlib.import_module(module_name)
        help_text = getattr(module, "HELP", module.__doc__.strip().splitlines()[0])
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_proxy_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._proxy_run(args) or 0)
