"""``python -m ckpt_plugins.cli``: the ``ckpt-plugins`` command."""

import sys

from ckpt_plugins.cli.main import main

sys.exit(main())
