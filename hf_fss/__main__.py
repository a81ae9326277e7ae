"""`python -m hf_fss <verb> ...`: the `hf-fss` console command (`hf_fss.cli.main`)."""

import sys

from hf_fss.cli import main

if __name__ == "__main__":
    sys.exit(main())
