"""MM-SP: exact 2D (Ulysses × ring) sequence-parallel attention.

``attention`` (entry points) → ``hybrid`` (2D composition) → ``ulysses`` / ``ring`` → ``kernels``
(local block kernels); ``sharding`` splits and gathers sequences; ``comm_stats`` carries every
transfer and counts its bytes.
"""
