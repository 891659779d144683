import sys

from cllama.cli import main

sys.exit(main())
