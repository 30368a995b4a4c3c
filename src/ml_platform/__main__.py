"""``python -m ml_platform`` is ``mlp``."""

from ml_platform.cli import main

main()
