"""`python -m gptkit` (and `torchrun -m gptkit`) run the CLI."""

from gptkit.cli import main

raise SystemExit(main())
