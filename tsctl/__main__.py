"""`python -m tsctl` runs the CLI."""

from tsctl.cli import main

if __name__ == "__main__":
    main()
