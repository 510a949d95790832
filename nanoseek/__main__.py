import sys

from nanoseek.cli.main import main

if __name__ == "__main__":  # spawned worker processes import this module again
    sys.exit(main())
