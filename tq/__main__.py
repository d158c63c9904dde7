from tq.cli.main import main

main()
