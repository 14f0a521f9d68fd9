"""``python -m megatron_longvila.eval`` runs the longvila-eval CLI (see :mod:`.cli`)."""

import sys

from megatron_longvila.eval.cli import main

if __name__ == "__main__":  # importing the module (e.g. walking the package) runs nothing
    sys.exit(main())
