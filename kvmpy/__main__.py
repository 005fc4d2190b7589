import sys

from kvmpy.cli import main

sys.exit(main())
