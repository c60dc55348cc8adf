"""conveyor-vision edge node: finds damaged items on a conveyor before the divert point."""

__version__ = "0.1.0"
