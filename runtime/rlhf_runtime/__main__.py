"""``python -m rlhf_runtime``: the device command ``rlhf-run``."""

import sys

from rlhf_runtime.cli import main

sys.exit(main())
