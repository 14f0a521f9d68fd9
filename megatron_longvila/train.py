"""``python -m megatron_longvila.train stage.yaml [key=value ...]`` (under torchrun; ``--config
stage.yaml`` works too)."""

import sys

from megatron_longvila.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
