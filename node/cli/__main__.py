"""``python -m node.cli``: how serve starts its worker and acceptor processes."""

from node.cli.main import main

main()
