"""``python -m vmemu``: the command-line interface."""

from vmemu.cli import main

raise SystemExit(main())
