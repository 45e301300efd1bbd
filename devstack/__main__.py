"""`python -m devstack up|down|status`: see `devstack.stack`."""

import sys

from devstack.stack import main

sys.exit(main())
