"`python -m fastopt` runs the `fastopt` command line."
from .cli import main

if __name__ == '__main__': main()
