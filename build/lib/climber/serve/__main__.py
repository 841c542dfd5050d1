"""`python -m climber.serve --checkpoint ...`: the same as `climber serve` (docs/paper.md section 3.2)."""

import argparse
import sys

from climber.data.events import DataError
from climber.extras import MissingDependency
from climber.serve.command import add_serve_arguments, cmd_serve

ap = argparse.ArgumentParser(prog="python -m climber.serve", description="Serve a Climber checkpoint over HTTP.")
add_serve_arguments(ap)
try:
    cmd_serve(ap.parse_args())
except (DataError, FileNotFoundError, ValueError, MissingDependency) as e:  # as `climber` reports them
    print(f"climber serve: error: {e}", file=sys.stderr)
    sys.exit(2)
