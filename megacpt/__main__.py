"""`python -m megacpt ...` is the same as the `megacpt` console script."""
import sys

from megacpt.cli import main

sys.exit(main())
