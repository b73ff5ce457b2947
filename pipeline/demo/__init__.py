"""The demo: a procedural video world, the tiny Video-LLM trained on it, its scoring and its training.

Nothing in the production pipeline depends on this package except two things of the embedded default:
the sample videos a run without ``--input`` generates (``world.write_sample_dataset``) and the location
of the committed demo model (``model_dir.default_model_dir``, the ``model/`` folder beside this file).

- ``world``: seeded clips of coloured shapes that appear, move and disappear, with ground-truth
  captions, questions and multiple-choice items; H.264 encoding; the sample dataset.
- ``builders``: the demo model's word-level tokenizer, processor and Qwen2-VL config; saving a model
  directory; a small untrained stand-in for tests. ``model_dir``: where the committed model lives and
  what a model directory must hold (no torch).
- ``scoring``: the world's caption-attribute metrics and a greedy evaluation loop.
- ``training``: the training run behind ``python -m jobs.train_demo_model``; ``card``: its model card.
"""
