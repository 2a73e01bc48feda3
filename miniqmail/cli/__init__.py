"""One thin module per client program: arguments in, one library call, an exit code out."""
