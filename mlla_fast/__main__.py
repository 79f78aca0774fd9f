import sys

from mlla_fast.cli import main

sys.exit(main())
