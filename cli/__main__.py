"""`python -m sdxl_split.cli` is the same as the `sdxl-split` console script."""

from sdxl_split.cli.main import entry

entry()
