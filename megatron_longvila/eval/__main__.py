"""``python -m megatron_longvila.eval`` runs the longvila-eval CLI (see :mod:`.cli`)."""

import sys

from megatron_longvila.eval.cli import main

sys.exit(main())
