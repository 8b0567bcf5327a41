from ossedge.convert.cli import main

main()
