"""`python -m chx ...` (used with torchrun: `torchrun --nproc_per_node 2 -m chx train-backbone ...`)."""

from chx.cli import main

if __name__ == "__main__":
    main()
