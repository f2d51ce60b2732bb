"""fedpriv's ServerApp: Flower calls `main` with a Grid; everything else is in `run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, dict(context.run_config))
