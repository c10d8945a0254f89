"""The ``mxgate`` program (``python -m mxgate``, the console script): the core's command line
(:mod:`mxgate.core.cli`) and ``mxgate demo`` (:mod:`mxgate.demo`, outside the core, which does not import it)."""

import sys
from collections.abc import Sequence

from mxgate import demo
from mxgate.core import cli


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, commands=(demo.register_cli,))


if __name__ == "__main__":
    sys.exit(main())
