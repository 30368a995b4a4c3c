"""A module that ends its process when imported: the server must survive a reference to it."""

import sys

sys.exit(3)
