"""python -m classify: classify a folder or a list of photos, offline (classifier/cli/classify.py)."""

import sys

from classifier.cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
