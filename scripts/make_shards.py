"""Build WebDataset shards + sizes.json; the same as the `modx-shards` command."""

import sys

from modx.data.cli import shards_main

if __name__ == "__main__":
    sys.exit(shards_main())
