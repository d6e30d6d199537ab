"""Lambda adapters: parse the event, call the polars-free part of the core, return.

Nothing imported here may pull in polars or deltalake: these deploy as small zip Lambdas.
"""
