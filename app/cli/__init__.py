"""The kvstudio command line: `main` (the parser and its commands), `options` (engine and sampling options shared by
the commands), `bench` (the benchmark commands), `doctor`."""
