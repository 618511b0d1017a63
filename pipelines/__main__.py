import sys

from pipe_align.pipelines.cli import main

sys.exit(main())
