"""`python -m fuyou`: the `fuyou` command."""
import sys

from .cli import main

sys.exit(main())
