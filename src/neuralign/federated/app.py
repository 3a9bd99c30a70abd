"""Module-level Flower apps for ``flwr run`` / SuperLink + SuperNode deployments.

A Flower App project points at them in its ``pyproject.toml``::

    [tool.flwr.app.components]
    serverapp = "neuralign.federated.app:server_app"
    clientapp = "neuralign.federated.app:client_app"
"""

from neuralign.federated.client import make_client_app
from neuralign.federated.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
