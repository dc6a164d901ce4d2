import sys

from stabilize.launcher import main

if __name__ == "__main__":
    sys.argv[0] = "stabilize"  # usage lines say "stabilize ...", not "__main__.py ..."
    main()
