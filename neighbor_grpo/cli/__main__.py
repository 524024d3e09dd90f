"""`python -m neighbor_grpo.cli` (how accelerate and torchrun launch the command)."""

import sys

from neighbor_grpo.cli.commands import main

sys.exit(main())
