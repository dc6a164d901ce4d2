import sys

from stabilize.cli import main

if __name__ == "__main__":
    sys.argv[0] = "stabilize"  # usage lines say "stabilize ...", not "__main__.py ..."
    main()
