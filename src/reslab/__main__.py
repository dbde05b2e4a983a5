"""`python -m reslab ...` and `torchrun ... -m reslab train ...`."""
import sys

from .cli import main

sys.exit(main())
