"""Measuring the library: benchmark reports (``tdm-fast bench``), the per-phase step profiler, FLOP
counts and the memory plan (``tdm-fast plan``)."""
