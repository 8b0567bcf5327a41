from ossedge.cli.main import main

main()
