"""Evaluations of long-video models: needle in a haystack, VideoMME-format multiple choice and
captioning scores.

* :class:`~.predictor.Predictor` — what a harness asks of a model (answers, option scores);
  :class:`~.generator_predictor.GeneratorPredictor` serves it from an MM-SP ``Generator``.
* :func:`~.needle.run_needle_eval` + :func:`~.heatmap.plot_needle_heatmap`;
  :func:`~.videomme.run_videomme`; :func:`~.captioning.run_captioning`.
* :class:`~.results_file.ResultsFile` — the resumable JSON every evaluation writes.
* ``longvila-eval needle|videomme|caption`` (``python -m megatron_longvila.eval``) — the CLI.
"""
