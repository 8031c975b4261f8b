"""python -m collapsediag.cli: the collapsediag command."""
import sys

from . import main

sys.exit(main())
