from clpipe.cli import main

main()
