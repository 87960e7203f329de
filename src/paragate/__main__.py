from paragate.cli import main

main()
