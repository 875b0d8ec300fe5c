"""On PYTHONPATH in fault tests only: installs FASTDPO_FAULT (tests/faults.py) in the training process it names, so
a fault reaches a rank started by torchrun, accelerate or srun without any hook in the product."""

import os
import sys

if os.environ.get("FASTDPO_FAULT") and "RANK" in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import faults

    sys.path.pop(0)

    faults.from_environment()
