"""One module per training stage; each is a command of the same name."""
