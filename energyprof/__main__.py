import sys

from energyprof.cli import main

sys.exit(main())
