"""``python -m scheduler`` is the ``mriq`` command (handy where the console script is absent)."""

from scheduler.cli import main

if __name__ == "__main__":
    main()
