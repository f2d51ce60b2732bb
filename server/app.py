"""fedpriv's ServerApp: Flower calls `main` with a Grid; everything else is in `run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import with_recommended
from server.federation import run_federation
from server.rounds import deployed, packed_if_deployed, shorten_reply_object_waits

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # A run submitted with `flwr run` may leave training keys at 0 ("recommended"): resolved here, so the
    # records (config.toml) say what ran.
    if deployed(grid):  # the simulation engines' grids pull no objects
        shorten_reply_object_waits()
    run_federation(packed_if_deployed(grid), with_recommended(context.run_config))
