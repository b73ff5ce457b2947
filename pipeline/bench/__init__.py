"""Benchmarks of the StD decoder and of the annotation pipeline (``python -m jobs.benchmark``).

- :mod:`~pipeline.bench.presets`: real-shape random-weight 7B presets and a small CPU "kv-bound" one;
- :mod:`~pipeline.bench.inputs`: synthetic inputs (vision features given directly) and demo-world clips;
- :mod:`~pipeline.bench.measure`: one timed ``generate`` call of one variant (std, dense, auto, hf,
  hf_gqa);
- :mod:`~pipeline.bench.decoder`: one configuration, every variant interleaved after a warm-up, medians;
- :mod:`~pipeline.bench.records`: the record of one configuration (what each field means);
- :mod:`~pipeline.bench.projection`: the i.i.d. acceptance model, projected speedups, bandwidth;
- :mod:`~pipeline.bench.report`: markdown / CSV tables and the speedup figure;
- :mod:`~pipeline.bench.runner`: the decoder benchmark as one call (grid, sweep files);
- :mod:`~pipeline.bench.pipeline_bench`: throughput of the decode stage, the annotate stage and the
  whole pipeline on local Ray;
- :mod:`~pipeline.bench.prefix_memory`: the shared prefill's dense cache with the video's prefix copied
  per question vs stored once: cache bytes, a fresh process's peak RSS and decode speed, side by side.

*Measured* numbers come from timed runs; *projected* numbers (``projected_*``) combine measured step
costs with a stated acceptance profile and are never mixed with measured ones.
"""
