from hpcrender.cli import main

main()
