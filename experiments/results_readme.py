"""Writes experiments/results/README.md from the results files beside it (the code is in
experiments/results_page/).

  python experiments/results_readme.py            # rewrite experiments/results/README.md
  python experiments/results_readme.py --check    # exit 1 if it is stale
"""

import sys

from results_page import main

if __name__ == "__main__":
  sys.exit(main(sys.argv))
