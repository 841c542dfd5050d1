"""`python -m climber.serve --checkpoint ...`: the same as `climber serve` (PAPER.md section 3.2)."""

import argparse

from climber.serve.app import add_serve_arguments, cmd_serve

ap = argparse.ArgumentParser(prog="python -m climber.serve", description="Serve a Climber checkpoint over HTTP.")
add_serve_arguments(ap)
cmd_serve(ap.parse_args())
