"""``python -m megatron_longvila.train --config stage.yaml [key=value ...]`` (under torchrun)."""

import sys

from megatron_longvila.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
