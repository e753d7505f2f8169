"""The command lines: `train` (train.py) and `explain` (explain.py); each is a thin layer over the library."""
