"""``python -m spai_cli``: the same as the ``spai`` command."""
import sys

from spai_cli.main import main

sys.exit(main())
