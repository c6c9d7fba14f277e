"""The REST API (documented at /docs). Writes need the bearer token (:mod:`.guard`)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from evomerge.service import views
from evomerge.service.jobs import Conflict, LaunchError, parse_job_text, refuse
from evomerge.service.security import Refused, check_export_name
from evomerge.service.sse import job_events
from evomerge.service.store import Store

YAML_BODY = {"requestBody": {"required": True, "content": {
    "application/x-yaml": {"schema": {"type": "string"}, "example": "name: my-search\n..."}}}}


class ExportRequest(BaseModel):
    """``mergekit`` / ``recipe``: the YAML comes back as a download; ``hf``: a model folder is
    written on the server, ``RUNS/.evomerge-service/JOB/exports/NAME``."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["mergekit", "recipe", "hf"] = "mergekit"
    name: str | None = None
    force: bool = False


def router(store: Store) -> APIRouter:
    api = APIRouter()

    def opened(name: str) -> tuple[Any, Any, dict[str, Any]]:
        try:
            return store.open(name)
        except KeyError:
            raise HTTPException(404, f"no job named {name!r}; GET /jobs lists them") from None

    def rows_of(name: str) -> tuple[list[dict[str, Any]], Any]:
        study, job, _ = opened(name)
        return (views.trial_rows(study, job) if study is not None else []), job

    @api.post("/jobs", status_code=201, openapi_extra=YAML_BODY, tags=["jobs"])
    async def submit(request: Request) -> dict[str, Any]:
        """Submit a job (its YAML as the body); it starts at once. 422 names the dotted key."""
        text = (await request.body()).decode("utf-8", errors="replace")
        return await asyncio.to_thread(submit_text, text)

    def submit_text(text: str) -> dict[str, Any]:
        try:
            job = parse_job_text(text, store.jobs.policy)
        except (Refused, ValueError) as err:
            raise HTTPException(422, refuse(err)) from None
        try:
            store.jobs.submit(job)
        except Conflict as err:
            raise HTTPException(409, str(err)) from None
        except LaunchError as err:
            raise HTTPException(502, str(err)) from None
        except ValueError as err:  # the preflight: what the job points at is not usable
            raise HTTPException(422, refuse(err)) from None
        return store.summary(job.name)

    @api.get("/jobs", tags=["jobs"])
    def list_jobs() -> list[dict[str, Any]]:
        """Every job: state, trials done/budget, best value, held-out of the best, timing."""
        return [store.summary(n) for n in store.jobs.names()]

    @api.get("/jobs/{name}", tags=["jobs"])
    def get_job(name: str) -> dict[str, Any]:
        study, job, status = opened(name)
        return {**views.summary(study, job, status), "job": job.model_dump(mode="json")}

    @api.post("/jobs/{name}/cancel", tags=["jobs"])
    def cancel(name: str) -> dict[str, Any]:
        """Stop the job cleanly; POST /jobs/{name}/resume continues it."""
        opened(name)
        try:
            store.jobs.cancel(name)
        except Conflict as err:
            raise HTTPException(409, str(err)) from None
        return store.summary(name)

    @api.post("/jobs/{name}/resume", tags=["jobs"])
    def resume(name: str) -> dict[str, Any]:
        """Continue a cancelled or interrupted job to its budget (``evomerge search --resume``)."""
        opened(name)
        try:
            store.jobs.resume(name)
        except Conflict as err:
            raise HTTPException(409, str(err)) from None
        except LaunchError as err:
            raise HTTPException(502, str(err)) from None
        return store.summary(name)

    @api.get("/jobs/{name}/trials", tags=["trials"])
    def trials(
        name: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10000),
        sort: str = "trial", order: Literal["asc", "desc"] = "asc", state: str | None = None,
    ) -> dict[str, Any]:
        """Trials (and reference merges) as rows; sort by any column, filter by state."""
        rows, _ = rows_of(name)
        if state:
            rows = [r for r in rows if r["state"] == state.upper()]
        has = [r for r in rows if isinstance(r.get(sort), int | float | str)]
        missing = [r for r in rows if not isinstance(r.get(sort), int | float | str)]
        has.sort(key=lambda r: (isinstance(r[sort], str), r[sort]), reverse=order == "desc")
        rows = has + missing
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return {"total": len(rows), "offset": offset, "columns": columns,
                "rows": rows[offset:offset + limit]}

    @api.get("/jobs/{name}/pareto", tags=["trials"])
    def pareto(name: str, x: str, y: str, dx: str | None = None, dy: str | None = None
               ) -> dict[str, Any]:
        """The non-dominated COMPLETE trials over metrics ``x`` and ``y`` (any two columns of
        /trials); ``dx``/``dy`` = maximize|minimize (default: the objective's direction)."""
        rows, job = rows_of(name)
        for d in (dx, dy):
            if d not in (None, "maximize", "minimize"):
                raise HTTPException(422, {"key": "dx", "error": f"{d!r}: use maximize or "
                                          "minimize"})
        out = views.pareto(rows, x, y, dx or views.direction_of(x, job),
                           dy or views.direction_of(y, job))
        study, _, _ = opened(name)
        recipes = {t.number: t.user_attrs.get("recipe", {})
                   for t in (study.get_trials(deepcopy=False) if study else [])}
        for p in out["points"]:
            p["recipe"] = views.recipe_text(recipes.get(p["trial"], {}))
        return out

    @api.get("/jobs/{name}/hypervolume", tags=["trials"])
    def hypervolume(name: str) -> list[dict[str, Any]]:
        rows, job = rows_of(name)
        return views.hypervolume(rows, job)

    def trial_of(name: str, number: int) -> Any:
        study, _, _ = opened(name)
        found = [t for t in (study.get_trials(deepcopy=False) if study else [])
                 if t.number == number]
        if not found or "recipe" not in found[0].user_attrs:
            raise HTTPException(404, f"job {name!r} has no trial {number} with a recipe")
        return found[0]

    @api.get("/jobs/{name}/trials/{number}/recipe", tags=["trials"])
    def recipe(name: str, number: int) -> dict[str, Any]:
        """The trial's recipe (dict and YAML) and its coefficient heatmap."""
        from evomerge.recipe import Recipe

        r = Recipe.from_dict(trial_of(name, number).user_attrs["recipe"])
        return {"trial": number, "recipe": r.to_dict(), "yaml": r.to_yaml(),
                "heatmap": views.heatmap(r)}

    @api.get("/jobs/{name}/trials/{number}/scores", tags=["trials"])
    def scores(name: str, number: int) -> dict[str, Any]:
        """The trial's scores per task next to each source model and the uniform merge."""
        rows, job = rows_of(name)
        try:
            return views.scores(rows, number, job)
        except KeyError:
            raise HTTPException(404, f"job {name!r} has no trial {number}") from None

    @api.post("/jobs/{name}/trials/{number}/export", tags=["trials"])
    def export(name: str, number: int, req: ExportRequest) -> Response:
        """mergekit / recipe: a YAML download; hf: a folder written under the runs folder."""
        from evomerge.runs.export import export_run

        _, job, _ = opened(name)
        trial_of(name, number)
        run = job.resolved_run_dir
        url = store.jobs.policy.storage
        if req.format == "hf":
            try:
                out = (store.jobs.folder(name) / "exports" /
                       check_export_name(req.name or f"trial-{number}")).resolve()
                out.parent.mkdir(parents=True, exist_ok=True)
                export_run(run, out, "hf", trial=number, force=req.force,
                           storage_url=url)
            except (Refused, ValueError, FileExistsError) as err:
                raise HTTPException(422, {"key": "name", "error": str(err)}) from None
            return Response(f'{{"path": "{out}"}}', media_type="application/json")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "export.yaml"
            export_run(run, out, req.format, trial=number, storage_url=url)
            text = out.read_text()
        filename = f"{name}-trial-{number}-{req.format}.yaml"
        return Response(text, media_type="application/x-yaml", headers={
            "content-disposition": f'attachment; filename="{filename}"'})

    @api.get("/jobs/{name}/events", tags=["jobs"])
    async def events(name: str, request: Request) -> StreamingResponse:
        """Server-sent events: ``trial`` per finished trial, ``job`` on state/progress."""
        _, job, _ = opened(name)

        def read() -> tuple[list[Any], dict[str, Any]]:
            study, job2, status = store.open(name)
            return (study.get_trials(deepcopy=False) if study else []), views.summary(
                study, job2, status)

        gen = job_events(read, [o.label for o in job.objectives], request.is_disconnected)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return api
