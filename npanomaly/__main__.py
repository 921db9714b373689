import sys

from npanomaly.cli import main

sys.exit(main())
