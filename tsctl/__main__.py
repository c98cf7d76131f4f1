"""`python -m tsctl` runs the CLI."""

from tsctl.cli.entry import main

if __name__ == "__main__":
    main()
