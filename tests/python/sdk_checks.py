"""What the SDK scripts share: how they are called (`python3 SCRIPT BASE_URL KEY`) and the
count of passed checks, one printed line each and `N checks passed` at the end (the Rust
tests read that line).

The scripts import this module by name: Python puts a script's own folder on sys.path.
"""

import sys


class Checks:
    """Counts the checks a script passed."""

    def __init__(self) -> None:
        self.count = 0

    def passed(self, *line) -> None:
        """Counts one check and prints `line` (print's arguments) for it."""
        self.count += 1
        print(*line)


def run(main) -> None:
    """Calls `main(base_url, key, checks)` with the command line's arguments, prints the count
    and exits 0; a failed check raises, and so exits non-zero."""
    checks = Checks()
    main(sys.argv[1], sys.argv[2], checks)
    print(f"{checks.count} checks passed")
    sys.exit(0)
