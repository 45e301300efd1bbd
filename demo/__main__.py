"""`python -m demo` (`just demo`): see demo/run.py."""

import sys

from demo.run import main

if __name__ == "__main__":
    sys.exit(main())
