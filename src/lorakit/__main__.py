"""`python -m lorakit` (and `torchrun -m lorakit`) enter the same CLI as the `lorakit` command."""

from lorakit.cli import main

if __name__ == "__main__":
    main()
