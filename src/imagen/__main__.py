import sys

from imagen.cli.main import main

sys.exit(main())
