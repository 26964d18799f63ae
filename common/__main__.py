from common.cli import main

main()
