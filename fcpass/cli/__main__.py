"""`python -m fcpass.cli`: the `fcpass` command."""

import sys

from fcpass.cli import main

sys.exit(main())
