"""E-commerce lakehouse: raw CSVs to validated, partitioned Delta tables with Polars and delta-rs."""

__version__ = "0.1.0"
