import sys

from bmclip.cli import main

sys.exit(main())
