import sys

from decoupled.cli import main

sys.exit(main())
