"""One module per stage; each composes data/, models/, store/, losses and metrics."""
