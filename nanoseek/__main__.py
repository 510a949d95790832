import sys

from nanoseek.cli.main import main

sys.exit(main())
