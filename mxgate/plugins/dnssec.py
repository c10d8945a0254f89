"""Built-in agent: DNSSEC-aware resolution for the delivery path (mode ``validating_resolver``).

Status: the resolver facade lives in :mod:`mxgate.core.dns`; this plugin runs the start-up self-test and
reports its result (issue "DNSSEC-aware resolution").
"""

from __future__ import annotations

name = "dnssec"
priority = 50
