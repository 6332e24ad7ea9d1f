import sys

from tdcompile.cli import main

sys.exit(main())
