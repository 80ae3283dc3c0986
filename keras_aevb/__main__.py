"""`python -m keras_aevb ...`: the `keras-aevb` command line (see keras_aevb.cli)."""

import sys

from keras_aevb.cli import main

if __name__ == "__main__":
    sys.exit(main())
