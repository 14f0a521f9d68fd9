"""Planning a training job from closed-form costs, below training (which plans ``parallel: auto``
with it) and above the models whose memory it prices.

* :mod:`.workload` — the model shape and the parallel strategies;
* :mod:`.cost_model` — exact per-rank FLOPs, bytes (comm_stats' formulas) and memory;
* :mod:`.simulator` — predicted step time and memory on a described cluster;
* :mod:`.clusters` — cluster presets with the sources of their numbers;
* :mod:`.planner` — the best layout of each family under the constraints, and the fit lengths.
"""
