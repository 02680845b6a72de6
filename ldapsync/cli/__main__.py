"""``python -m ldapsync.cli``: the same as the ``ldapsync`` command."""

from ldapsync.cli import main

raise SystemExit(main())
