"""Developer tools, run as ``python -m relay.tools.<name>`` wherever the package is installed:
the flags-table writer, the load tester, the benchmark's fake upstream, the benchmark and
its attacker.

The product never imports this package (tests/test_layout.py checks it): what is
here maintains and measures the relay, it does not serve.
"""
