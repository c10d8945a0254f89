"""``mxgate`` with uvloop hidden, so ``mxgate run`` falls back to asyncio (``bench/run.py --mxgate-loop asyncio``).

A file rather than ``python -c "...; ..."`` so that profiles show a clean process name.
"""

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` now raises ImportError

from mxgate.core.cli import main  # noqa: E402

sys.exit(main())
