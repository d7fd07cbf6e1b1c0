"""The data users bring: records and their validation, the pool manifest, benchmarks."""
