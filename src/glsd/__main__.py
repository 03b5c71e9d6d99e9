import sys

from glsd.cli import main

sys.exit(main())
