import sys

from mxgate.core.cli import main

sys.exit(main())
