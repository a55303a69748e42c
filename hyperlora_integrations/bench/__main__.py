"""``python -m hyperlora_integrations.bench``: the same as ``hyperlora bench``."""

from .cli import main

raise SystemExit(main())
