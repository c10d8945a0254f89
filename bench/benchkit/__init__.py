"""Benchmark harness for mxgate: the floor (bare aiosmtpd), a temporary Postfix, and mxgate, measured alike.

Entry point: ``bench/run.py`` (``make bench``). See ``bench/RESULTS.md`` for what is measured and how.
"""
