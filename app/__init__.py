"""kvstudio application layer: command line, model store and everything else that is not Qt."""
