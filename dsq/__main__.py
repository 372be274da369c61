"""`python -m dsq ...`: the dsq command line (also what `torchrun -m dsq ...` runs)."""

from .cli import main

main()
