"""Make the plugin importable when its tests run from a source checkout without ``pip install -e .``.

mxgate's fixtures (``mxgate_gateway``, ``smtp_sink``, ``test_ca``, ``dnslab``) need no import: installing mxgate
registers them as the pytest plugin ``mxgate`` (entry point group ``pytest11``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("mxgate_route_by_header") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
