"""``python -m penguin_vl``: the ``penguin-vl`` command."""

from penguin_vl.cli import main

raise SystemExit(main())
