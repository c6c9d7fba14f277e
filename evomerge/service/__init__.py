"""``evomerge serve``: a web service and dashboard over the same storage the CLI uses.

- :mod:`~evomerge.service.runner`: the job process (the ``evomerge search`` driver, plus a status
  file and a clean stop on SIGTERM); :mod:`~evomerge.service.jobs` launches and finds them;
- :mod:`~evomerge.service.views`: what the API reads from a study (table, Pareto, heatmap);
- :mod:`~evomerge.service.security`: the token, the allowed roots, the body cap;
- :mod:`~evomerge.service.app`: the FastAPI app, its routes and the static page.
"""
