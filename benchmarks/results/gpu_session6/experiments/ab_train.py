import sys
sys.path.insert(0, "scratch")
import variants  # noqa: F401  (applies CLIMBER_AB)
from climber.cli import main
main(sys.argv[1:])
