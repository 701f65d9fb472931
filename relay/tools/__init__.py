"""Developer tools run from a checkout (``python -m relay.tools.<name>``).

The product never imports this package (a test checks it): what is here
maintains the repository, it does not serve.
"""
