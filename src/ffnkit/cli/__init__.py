"""The ``ffnkit`` command line: thin layers over the public Python functions."""
