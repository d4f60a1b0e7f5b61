import sys

from ckpt_plugins.cli.main import main

sys.exit(main())
