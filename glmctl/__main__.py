from glmctl.cli import main

main()
