"""The Flower App components for a deployment (``flwr run``): the same ServerApp and ClientApp
as the simulation, configured from the run config instead of a Python object.

Run config (``[tool.flwr.app.config]`` of the app's pyproject.toml, see
:func:`dptrain.federated.deploy.write_app`): ``recipe`` (the recipe's YAML text) and
``output-dir`` (the server's run directory).  Node config of each SuperNode:
``partition-id`` (which client of the recipe it is), ``num-partitions``, and the data
holder's own settings -- ``state-dir`` and ``epsilon`` (required), ``delta``, ``accountant``,
``min-noise-multiplier``, ``data-path``, ``client-config`` (see
:mod:`dptrain.federated.holder`).  A client without them declines every round, saying why.
"""

from __future__ import annotations

import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..recipe import RecipeError, parse_recipe
from .client import confined_train_round
from .recipe import FederatedRecipe
from .server import run_server, start_run


def recipe_of(context: Context) -> FederatedRecipe:
    recipe = parse_recipe(yaml.safe_load(str(context.run_config["recipe"])), "run config")
    if not isinstance(recipe, FederatedRecipe):
        raise RecipeError("the run config's recipe has no federated section")
    return recipe


serverapp = ServerApp()
clientapp = ClientApp()


@serverapp.main()
def _server(grid: Grid, context: Context) -> None:
    recipe = recipe_of(context)
    run_server(grid, recipe, start_run(recipe, str(context.run_config["output-dir"])))


@clientapp.train()
def _train(msg: Message, context: Context) -> Message:
    return confined_train_round(msg, context, recipe_of(context), None)  # own: node config
