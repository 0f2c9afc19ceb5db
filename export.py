"""python -m export: export the weights into the model file a slim replica serves (classifier/cli/export.py)."""

import sys

from classifier.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
