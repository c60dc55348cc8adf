"""`python -m edge`: the `edge-node` command."""

import sys

from edge.commands.main import main

sys.exit(main())
