"""`python -m mailproxy`: the same command as the `mailproxy` console script."""

from .cli import main

if __name__ == "__main__":
    main()
