"""Ray Data video-annotation pipeline: read, decode frames, annotate on actors, write Parquet, account."""
