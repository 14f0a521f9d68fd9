"""Convert LongVILA checkpoints between megatron and Hugging Face: ``longvila-convert``."""

import sys

from megatron_longvila.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
