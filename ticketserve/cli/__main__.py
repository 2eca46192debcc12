"""`python -m ticketserve.cli`: the same command as `ticketserve`."""

from ticketserve.cli.app import main

main()
