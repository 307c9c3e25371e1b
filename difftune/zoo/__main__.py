"""``python -m difftune.zoo data --out DIR``: write the MNIST benchmark folders (see `difftune.zoo.mnist`)."""

import sys

from ..cli import main

raise SystemExit(main(["zoo", *sys.argv[1:]]))
