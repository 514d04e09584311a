"""`python -m fuyou.cli`: the `fuyou` command."""
import sys

from . import main

sys.exit(main())
