"""`python -m ldm_core ...`: the command-line interface (see ldm_core.cli)."""

from .cli import main

raise SystemExit(main())
