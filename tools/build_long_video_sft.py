"""Build a long-video instruction dataset from raw videos: ``longvila-build-sft``."""

import sys

from megatron_longvila.long_video_sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
