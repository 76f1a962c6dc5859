"""`python -m subsetsel ...` (what torchrun starts: `torchrun --nproc-per-node N -m subsetsel`)."""

from subsetsel.cli import main

if __name__ == "__main__":
    main(prog_name="subsetsel")
