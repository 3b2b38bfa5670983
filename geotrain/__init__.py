"""geotrain: the application package.

Installed as ``geotrain``; the role folders of the repository are installed beneath it
(``geotrain.common``, ``geotrain.coordinator``, ``geotrain.worker``, ``geotrain.protos``), so nothing
generic lands at the top of ``site-packages``. This package holds what may depend on every role:
the umbrella ``geotrain`` command (cli.py) and the loopback launcher behind ``geotrain demo``
(demo.py).
"""

from geotrain.common import __version__

__all__ = ["__version__"]
