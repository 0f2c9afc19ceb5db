"""python -m quantize: build the int8 model PRECISION=int8 serves (classifier/cli/quantize.py)."""

import sys

from classifier.cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
