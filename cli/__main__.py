import sys

from otclip.main import main

sys.exit(main())
