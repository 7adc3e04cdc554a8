"""`python -m cargohold` runs the command line."""

from cargohold.cli import main

raise SystemExit(main())
