"""The benchmark and profiling harness of intl_ops: every performance number comes from here.

Run `python -m bench --help`; how to read the table: bench/README.md.
"""
