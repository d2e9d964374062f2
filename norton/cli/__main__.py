"""``python -m norton.cli`` = the ``norton`` command (e.g. under torchrun)."""
import sys

from norton.cli import main

sys.exit(main())
