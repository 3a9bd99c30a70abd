from neuralign.cli import main

main()
