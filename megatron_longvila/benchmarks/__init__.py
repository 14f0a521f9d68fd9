"""Benchmarks of MM-SP against ring-only, Ulysses-only and Megatron CP+TP, and a cluster simulator.

* :mod:`.workload` — the model shape and the parallel strategies compared;
* :mod:`.cost_model` — exact per-rank FLOPs, bytes (comm_stats' formulas) and memory;
* :mod:`.simulator` — predicted step time and memory on a described cluster;
* :mod:`.planner` — the best layout of each family under the constraints, and the fit lengths;
* :mod:`.scaling_study` / :mod:`.study_report` — the planner on the paper's settings;
* :mod:`.attention_peers` — attention alone, ours beside DeepSpeed-Ulysses and yunchang;
* :mod:`.calibration` — the simulator's rates fitted to this machine (CPU, gloo);
* :mod:`.gpt_step` — one measured training step of a megatron-core GPT per strategy;
* :mod:`.report` — JSON, markdown and PNG output.

Nothing here imports models/, data/ or training/: the benchmark runs megatron-core's own GPTModel
with the MM-SP layer spec from core/.
"""
