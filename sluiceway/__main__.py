import sys

from sluiceway import main

sys.exit(main())
