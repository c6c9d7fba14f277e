"""Reading a finished (or running) search from its storage: shared by the CLI and a service.

``results`` opens a run by folder, job YAML or storage URL + study name and gives the trial
table, best trials and Pareto front; ``export`` writes a trial or recipe as a Hugging Face model
folder (with a ``model_card``) or as a mergekit YAML (``export_mergekit``). Importing this
package imports no submodule.
"""
