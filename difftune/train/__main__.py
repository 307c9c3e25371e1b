"""``python -m difftune.train CONFIG.yaml [--set key=value ...]`` — what ``accelerate launch -m`` runs."""

import sys

from ..cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
