"""The data loading pipeline: decoding, shards, streaming, converters."""
