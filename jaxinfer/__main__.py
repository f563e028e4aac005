from jaxinfer.cli import main

main()
