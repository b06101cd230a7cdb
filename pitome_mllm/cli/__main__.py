"""``python -m pitome_mllm.cli``: the same as the ``pitome-mllm`` command."""

import sys

from . import main

sys.exit(main())
