"""`python -m ticketserve.core.kernels build`: compile the kernels (the install runs it)."""

import sys

from ticketserve.core.kernels import best_level, build

if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m ticketserve.core.kernels build")
    print(f"built {build()}; this CPU's dispatch level: {best_level()} (2 AVX-512, 1 AVX2, 0 portable)")
