from climber.cli import main

main()
