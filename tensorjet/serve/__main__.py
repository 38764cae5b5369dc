"""`python -m tensorjet.serve [MODEL] [options]`: the same as `tensorjet serve`, and what torchrun runs on
every rank (`torchrun ... -m tensorjet.serve MODEL --tensor_parallel_size N`)."""

import sys

from tensorjet.serve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
