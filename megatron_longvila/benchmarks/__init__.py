"""Benchmarks of MM-SP against ring-only, Ulysses-only and Megatron CP+TP, on this machine and
predicted for clusters (the cost model, simulator and planner they use live in
:mod:`megatron_longvila.planning`, below training, which plans ``parallel: auto`` with them).

* :mod:`.scaling_study` / :mod:`.study_report` — the planner on the paper's settings;
* :mod:`.attention_peers` — attention alone, ours beside DeepSpeed-Ulysses and yunchang;
* :mod:`.calibration` — the simulator's rates fitted to this machine (CPU, gloo);
* :mod:`.gpt_step` — one measured training step of a megatron-core GPT per strategy;
* :mod:`.layer_memory` / :mod:`.memory_options` — activation memory measured against the cost
  model's formulas;
* :mod:`.report` — JSON, markdown and PNG output.
"""
