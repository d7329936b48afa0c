"""Pretraining on SLURM through submitit (see :mod:`franca.run.submit` and training.md)::

python -m franca.run.train --nodes N --ngpus G [--partition P ...] --config-file F --output-dir D [key=value ...]
"""

import sys

from franca.run.submit import main

if __name__ == "__main__":
    sys.exit(main())
