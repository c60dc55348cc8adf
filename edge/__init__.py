"""conveyor-vision edge node: finds damaged items on a conveyor before the divert point.

Importing any part of the package changes nothing in the process: the process-wide settings
the node runs with are applied by `edge.app.process.tune_process`, called by the commands.
"""

__version__ = "0.1.0"
