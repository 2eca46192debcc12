from ticketserve.cli.app import main

main()
