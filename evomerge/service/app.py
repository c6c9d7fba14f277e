"""The FastAPI app: the API (:mod:`.routes`), the page (``static/``), plotly.js from the
installed ``plotly`` package (no CDN), behind the :mod:`.guard` middleware.

>>> from evomerge.service.security import Policy
>>> app = create_app(Policy(token="t", runs=Path("runs")))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from evomerge import __version__
from evomerge.service.guard import BodyTooLarge, Guard
from evomerge.service.jobs import Jobs
from evomerge.service.routes import router
from evomerge.service.security import Policy
from evomerge.service.store import Store

STATIC = Path(__file__).with_name("static")


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the ``plotly`` wheel."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def create_app(policy: Policy, *, ray_address: str | None = None,
               optuna_dashboard_url: str | None = None) -> Any:
    """The service over ``policy.runs`` (and ``policy.storage``), wrapped in the guard."""
    app = FastAPI(title="evomerge", version=__version__,
                  description="Submit merge-recipe searches, watch their Pareto fronts, export.")
    store = Store(Jobs(policy, ray_address=ray_address))
    app.include_router(router(store))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_file() -> FileResponse:
        return FileResponse(plotly_js(), media_type="text/javascript")

    @app.get("/api/config", tags=["service"])
    def config() -> dict[str, Any]:
        """What the page needs to know about this server."""
        return {"version": __version__, "optuna_dashboard": optuna_dashboard_url,
                "token_for_reads": policy.token_for_reads, "ray": ray_address is not None}

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Any, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": f"the request body is over {exc.args[0]} bytes"}, 413)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.store = store
    return Guard(app, policy)
