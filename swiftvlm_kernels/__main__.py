"""`python -m swiftvlm_kernels [demo|eval|ops] [options]`: the command line, swiftvlm_kernels/apps/cli.py."""
import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
