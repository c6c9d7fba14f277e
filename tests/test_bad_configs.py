"""A corpus of bad job configs: each is refused by ``evomerge search`` with exit code 2 and ONE
stderr line naming the dotted key or the file, before Ray starts and before anything is written.

Each case is (id, builder, expected text): the builder turns the asset paths into a config
(a dict dumped as YAML, or raw YAML text/bytes). A good config is checked to pass ``validate``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge import cli
from evomerge.search import driver
from tests.conftest import make_tiny_arch, make_tiny_llama

Build = Callable[[dict[str, str]], Any]
ROWS = [{"prompt": f"{w}>", "answer": w[::-1]} for w in ("abc", "de", "fgh", "ij")]


def _jsonl(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save(model: Any, tok: Any, path: Path, **kw: Any) -> None:
    model.save_pretrained(path, **kw)
    tok.save_pretrained(path)


def make_assets(root: Path, tiny: dict[str, Path]) -> dict[str, str]:
    """Data files and odd model folders next to the tiny models; name -> path."""
    from transformers import MistralConfig, MistralForCausalLM

    out = {name: str(path) for name, path in tiny.items()}
    data = root / "data"
    _jsonl(data / "good" / "validation.jsonl", ROWS)
    _jsonl(data / "good" / "test.jsonl", ROWS)
    _jsonl(data / "notest" / "validation.jsonl", ROWS)
    _jsonl(data / "prompts.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    _jsonl(data / "texts.jsonl", [{"body": "x"} for _ in ROWS])
    _jsonl(data / "arrays.jsonl", [[1, 2]])
    (data / "empty.jsonl").write_text("\n")
    (data / "malformed.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS[:2]) + '{"prompt": "x", \n'
    )
    for name in ("good", "notest"):
        out[f"data_{name}"] = str(data / name)
    for name in ("prompts", "texts", "arrays", "empty", "malformed"):
        out[f"jsonl_{name}"] = str(data / f"{name}.jsonl")

    m = root / "models"
    wide, tok = make_tiny_llama(seed=1, intermediate_size=48)
    _save(wide, tok, m / "wide")
    _save(wide, tok, m / "wide_sharded", max_shard_size="40KB")
    same, _ = make_tiny_llama(seed=2)
    _save(same, tok, m / "sharded_gap", max_shard_size="40KB")
    next(iter(sorted((m / "sharded_gap").glob("model-*.safetensors")))).unlink()
    _save(make_tiny_llama(seed=3, num_hidden_layers=2)[0], tok, m / "shallow")
    _save(make_tiny_llama(seed=4, hidden_size=64, num_attention_heads=8,  # same head size
                          num_key_value_heads=4)[0], tok, m / "hidden64")
    _save(make_tiny_arch("qwen2_tied", seed=5)[0], tok, m / "qwen2")
    cfg = MistralConfig(**{k: getattr(same.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads")}, tie_word_embeddings=False)
    _save(MistralForCausalLM(cfg), tok, m / "mistral")
    a = tiny["a"]
    (m / "pickled").mkdir()
    shutil.copy(a / "config.json", m / "pickled")
    tok.save_pretrained(m / "pickled")
    (m / "pickled" / "pytorch_model.bin").write_bytes(b"not read by preflight")
    (m / "no_tokenizer").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(a / f, m / "no_tokenizer")
    (m / "no_weights").mkdir()
    shutil.copy(a / "config.json", m / "no_weights")
    tok.save_pretrained(m / "no_weights")
    shutil.copytree(a, m / "bad_json")
    (m / "bad_json" / "config.json").write_text('{"model_type": "llama",')
    shutil.copytree(a, m / "bad_header")
    (m / "bad_header" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    (m / "empty").mkdir()
    (m / "a_file.txt").write_text("not a model")
    for p in m.iterdir():
        out[p.name.removesuffix(".txt")] = str(p)
    return out


def good(a: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "bad-run",
        "run_dir": a["run_dir"],
        "models": {
            "base": {"path": a["base"]},
            "experts": {"a": {"path": a["a"]}, "b": {"path": a["b"]}},
        },
        "search": {
            "space": {"name": "parameter", "method": "ties", "layer_groups": 2},
            "sampler": {"name": "cmaes", "popsize": 4},
            "trials": 4,
        },
        "evaluators": [{"name": "accuracy", "data": a["data_good"], "limit": 4}],
        "objectives": [{"metric": "accuracy/good"}],
        "resources": {"workers": 1, "num_cpus": 1},
    }


def set_(path: str, value: Any) -> Build:
    """The good config with ``path`` (dotted; list items by index) set; a callable value is
    called with the assets, a ``DROP`` value deletes the key."""

    def build(a: dict[str, str]) -> dict[str, Any]:
        cfg = good(a)
        *parents, last = path.split(".")
        node: Any = cfg
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        v = value(a) if callable(value) else copy.deepcopy(value)
        if v is DROP:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = v
        return cfg

    return build


def merged(*builds: Callable[[dict[str, Any], dict[str, str]], None]) -> Build:
    def build(a: dict[str, str]) -> dict[str, Any]:
        cfg = good(a)
        for b in builds:
            b(cfg, a)
        return cfg

    return build


def expert(asset: str, name: str = "a") -> Build:
    return set_(f"models.experts.{name}", lambda a: {"path": a[asset]})


def data(asset: str, name: str = "accuracy", **kw: Any) -> Build:
    """One evaluator on an asset's data, and the objective on its metric."""

    def build(a: dict[str, str]) -> dict[str, Any]:
        cfg = good(a)
        cfg["evaluators"] = [{"name": name, "data": a[asset], **kw}]
        cfg["objectives"] = [{"metric": f"{name}/{Path(a[asset]).stem}"}]
        return cfg

    return build


def space(**kw: Any) -> Build:
    return set_("search.space", {"name": "parameter", **kw})


def dfs(**kw: Any) -> Build:
    return set_("search.space", {"name": "dfs", **kw})


def dfs_with(asset: str, **kw: Any) -> Build:
    """A dfs search whose expert ``b`` is the model ``asset``."""
    return merged(lambda c, a: c["models"]["experts"].update(b={"path": a[asset]}),
                  lambda c, a: c["search"].update(space={"name": "dfs", **kw}))


def yaml_text(text: str) -> Build:
    """Raw YAML: the good config's models section appended, so only the text's flaw matters."""
    return lambda a: text.replace("RUN_DIR", a["run_dir"]).replace("BASE", a["base"])


def under_file(key: str, make: Callable[[Path], str]) -> Build:
    def build(a: dict[str, str]) -> dict[str, Any]:
        (Path(a["tmp"]) / "plain_file").write_text("x")
        cfg = good(a)
        cfg[key] = make(Path(a["tmp"]) / "plain_file")
        return cfg

    return build


DROP = object()
BASE_YAML = """name: r
run_dir: RUN_DIR
models: {base: {path: BASE}, experts: {a: {path: BASE}}}
evaluators: [{name: cost}]
objectives: [{metric: cost/params}]
"""
BOUND = {"low": 0.1, "high": 0.9}
NAN, INF = float("nan"), float("inf")
ACC2 = [{"name": "accuracy", "data": "D"}]

CASES: list[tuple[str, str, Build, str]] = [
    # (class, id, builder, expected text in the one stderr line)
    ("schema", "unknown_top_key", set_("evaluator", []), "unknown key 'evaluator'. Did you mean"),
    ("schema", "unknown_nested_key", set_("search.sampler.popsiz", 4),
     "search.sampler: unknown key 'popsiz'. Did you mean 'popsize'"),
    ("schema", "unknown_evaluator", set_("evaluators.0.name", "acuracy"),
     "evaluators.0.name: unknown name 'acuracy'. Did you mean 'accuracy'"),
    ("schema", "unknown_sampler", set_("search.sampler", {"name": "cmaess"}),
     "search.sampler.name: unknown name 'cmaess'"),
    ("schema", "unknown_method", space(method="tie"), "unknown merge method 'tie'"),
    ("range", "dfs_repeats_zero", dfs(repeats=0),
     "search.space.repeats: Input should be greater than or equal to 1"),
    ("range", "dfs_max_path_zero", dfs(max_path_length=0),
     "search.space.max_path_length: Input should be greater than or equal to 1"),
    ("schema", "dfs_one_model", dfs(models=["a"]), "search.space.models: ['a'] is one model"),
    ("schema", "dfs_unknown_model", dfs(models=["a", "z"]),
     "search.space.models.1: unknown model 'z'"),
    ("schema", "then_after_dfs", merged(lambda c, a: c["search"].update(
        space={"name": "dfs"}, then={"space": {"name": "dfs"}})),
     "search.then: follows a ps search"),
    ("shapes", "dfs_hidden_size", dfs_with("hidden64"),
     "models.experts.b.path: model 'b' has hidden_size 64 but 'a' (model A) has 32"),
    ("shapes", "dfs_architecture", dfs_with("qwen2"),
     "models.experts.b.path: model 'b' has architecture qwen2 Qwen2ForCausalLM but 'a'"),
    ("shapes", "dfs_unsupported_type", dfs_with("mistral"),
     "models.experts.b.path: model 'b' is a 'mistral' model; the dfs engine chains"),
    ("shapes", "dfs_path_below_start", dfs(max_path_length=3),
     "search.space.max_path_length: 3 is below the start path, model A ('a') with 4 layers"),
    ("schema", "missing_models", set_("models", lambda a: DROP), "models: is required"),
    ("schema", "missing_objectives", set_("objectives", lambda a: DROP),
     "objectives: is required"),
    ("schema", "empty_experts", set_("models.experts", {}), "experts is empty"),
    ("schema", "expert_named_base", expert("a", "base"), "'base' is reserved"),
    ("schema", "expert_name_slash", expert("a", "a/b"),
     "models.experts.a/b: 'a/b' is not a plain"),
    ("schema", "top_level_list", yaml_text("- name: r\n"), "expected a mapping"),
    ("schema", "evaluator_without_name", set_("evaluators.0", {"data": "x"}),
     "evaluators.0: has no 'name'"),
    ("schema", "bounds_foreign_param", space(method="ties", bounds={"gamma": BOUND}),
     "bounds.gamma is not a parameter of ties"),
    ("schema", "fixed_unknown", space(fixed={"densty": 0.5}), "fixed.densty is not a parameter"),
    ("schema", "metric_and_weights", set_("objectives.0.weights", {"accuracy/good": 1}),
     "objectives.0: give exactly one of 'metric' or 'weights'"),
    ("schema", "slerp_two_experts", space(method="slerp"),
     "models.experts: slerp merges at most 1 model(s)"),
    ("schema", "needs_base", set_("models.base", lambda a: DROP),
     "models.base: is missing: method 'ties' needs models.base"),
    ("schema", "duplicate_metric", set_("evaluators", lambda a: [
        {"name": "accuracy", "data": a["data_good"]}] * 2),
     "evaluators.1: produces 'accuracy/good' like evaluators.0"),
    ("types", "trials_true", set_("search.trials", True),
     "search.trials: expected an integer, got true (a boolean)"),
    ("types", "trials_string", set_("search.trials", "7"),
     "search.trials: expected an integer, got '7' (a string)"),
    ("types", "trials_float", set_("search.trials", 3.5), "search.trials: expected an integer"),
    ("types", "popsize_bool", set_("search.sampler.popsize", False),
     "search.sampler.popsize: expected an integer, got false"),
    ("types", "sigma0_string", set_("search.sampler.sigma0", "0.1"),
     "search.sampler.sigma0: expected a number, got '0.1'"),
    ("types", "workers_true", set_("resources.workers", True), "resources.workers: expected an"),
    ("types", "limit_string", set_("evaluators.0.limit", "4"), "evaluators.0.limit: expected an"),
    ("types", "bound_string", space(bounds={"weight": {"low": "0", "high": 1}}),
     "search.space.bounds.weight.low: expected a number"),
    ("types", "bound_bool", space(bounds={"weight": {"low": 0, "high": True}}),
     "search.space.bounds.weight.high: expected a number, got true"),
    ("types", "allow_pickle_string", set_("load.allow_pickle", "yes"),
     "load.allow_pickle: expected true or false"),
    ("types", "baselines_int", set_("search.baselines", 1), "search.baselines: expected true"),
    ("types", "name_int", set_("name", 3), "name: expected a string, got 3"),
    ("types", "evaluators_mapping", set_("evaluators", {"name": "cost"}),
     "evaluators: expected a list"),
    ("types", "layer_groups_bool", space(layer_groups=True),
     "search.space.layer_groups: expected"),
    ("types", "fixed_flag_string", space(fixed={"normalize": "yes"}),
     "search.space.fixed.normalize: expected true or false"),
    ("types", "fixed_lambda_bool", space(fixed={"lambda": True}),
     "search.space.fixed.lambda: expected a finite number, got True"),
    ("types", "weights_string", set_("objectives.0", {"weights": {"accuracy/good": "1"}}),
     "objectives.0.weights.accuracy/good: expected a number"),
    ("range", "trials_zero", set_("search.trials", 0), "search.trials: Input should be greater"),
    ("range", "popsize_one", set_("search.sampler.popsize", 1), "search.sampler.popsize"),
    ("range", "density_above_1", space(bounds={"density": {"low": 0.5, "high": 1.5}}),
     "search.space.bounds.density.high: 1.5 is outside density's valid range (0, 1]"),
    ("range", "density_zero", space(bounds={"density": {"low": 0, "high": 1}}),
     "search.space.bounds.density.low: 0.0 is outside"),
    ("range", "gamma_one", space(method="breadcrumbs", bounds={"gamma": {"low": 0, "high": 1}}),
     "search.space.bounds.gamma.high: 1.0 is outside gamma's valid range [0, 1)"),
    ("range", "slerp_t_above_1", merged(
        lambda c, a: c["models"]["experts"].pop("b"),
        lambda c, a: c["search"].update(space={"name": "parameter", "method": "slerp",
                                                "bounds": {"t": {"low": 0, "high": 2}}})),
     "search.space.bounds.t.high: 2.0 is outside"),
    ("range", "low_above_high", space(bounds={"weight": {"low": 1, "high": 0}}),
     "search.space.bounds.weight: low (1.0) > high (0.0)"),
    ("range", "log_nonpositive", space(bounds={"weight": {"low": 0, "high": 1, "log": True}}),
     "log scale needs low > 0"),
    ("range", "fractions_not_ending_1", set_("search.fidelity", {"fractions": [0.25, 0.5]}),
     "search.fidelity: fractions must increase"),
    ("range", "fixed_lambda_string", space(fixed={"lambda": "2"}), "search.space.fixed.lambda"),
    ("range", "device_name", set_("load.device", "gpu0"), "load.device: 'gpu0' is not a device"),
    ("range", "num_cpus_zero", set_("resources.num_cpus", 0), "resources.num_cpus"),
    ("range", "weights_sum_zero", set_("objectives.0", {"weights": {"accuracy/good": 0}}),
     "objectives.0.weights: {'accuracy/good': 0.0} sums to 0"),
    ("nan_inf", "bound_nan", space(bounds={"weight": {"low": NAN, "high": 1}}),
     "search.space.bounds.weight.low: expected a finite number, got nan"),
    ("nan_inf", "bound_inf", space(bounds={"weight": {"low": 0, "high": INF}}),
     "search.space.bounds.weight.high: expected a finite number, got inf"),
    ("nan_inf", "sigma0_nan", set_("search.sampler.sigma0", NAN), "search.sampler.sigma0"),
    ("nan_inf", "fraction_nan", set_("search.fidelity", {"fractions": [NAN, 1.0]}),
     "search.fidelity.fractions.0: expected a finite number"),
    ("nan_inf", "weight_inf", set_("objectives.0", {"weights": {"accuracy/good": INF}}),
     "objectives.0.weights.accuracy/good: expected a finite number"),
    ("nan_inf", "num_gpus_inf", set_("resources.num_gpus", INF), "resources.num_gpus"),
    ("nan_inf", "fixed_lambda_nan", space(fixed={"lambda": NAN}), "search.space.fixed.lambda"),
    ("yaml", "duplicate_key", yaml_text(BASE_YAML + "name: again\n"),
     "job.yaml:6:1: duplicate key 'name'; keep one of them"),
    ("yaml", "duplicate_nested_key", yaml_text(BASE_YAML.replace(
        "{a: {path: BASE}}", "{a: {path: BASE}, a: {path: BASE}}")), "duplicate key 'a'"),
    ("yaml", "unclosed_bracket", yaml_text(BASE_YAML + "resources: {workers: [1\n"),
     "job.yaml:7:1: YAML syntax error"),
    ("yaml", "tab_indent", yaml_text(BASE_YAML + "search:\n\ttrials: 3\n"), "YAML syntax error"),
    ("yaml", "mapping_in_scalar", yaml_text("name: a: b\n"), "job.yaml:1:8: YAML syntax error"),
    ("yaml", "python_object_tag",
     yaml_text(BASE_YAML + "x: !!python/object/apply:os.system [ls]\n"),
     "job.yaml:6:4: the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("yaml", "custom_tag", yaml_text("name: !env RUN\n"), "the tag '!env' is not allowed"),
    ("yaml", "empty_file", yaml_text(""), "expected a mapping (key: value lines) at the top"),
    ("yaml", "not_utf8", lambda a: b"name: \xff\xfe\n", "not UTF-8 text"),
    ("names", "name_dotdot", set_("name", ".."), "name: '..' is not a plain name"),
    ("names", "name_dot", set_("name", "."), "name: '.' is not a plain name"),
    ("names", "name_hidden", set_("name", ".hidden"), "name: '.hidden' is not a plain name"),
    ("names", "name_slash", set_("name", "a/b"), "name: 'a/b' is not a plain name"),
    ("names", "name_empty", set_("name", ""), "name: '' is not a plain name"),
    ("run_dir", "run_dir_under_file", under_file("run_dir", lambda f: str(f / "run")),
     "run_dir: "),
    ("run_dir", "run_dir_is_file", under_file("run_dir", str), "is a file; choose another path"),
    ("run_dir", "journal_under_file", under_file("storage", lambda f: f"journal:{f}/j.log"),
     "storage: "),
    ("run_dir", "run_dir_read_only", lambda a: {**good(a), "run_dir": a["read_only"] + "/run"},
     "cannot be created in"),
    ("models", "model_missing", expert("missing"), "models.experts.a.path: model 'a': path"),
    ("models", "model_relative_missing", set_("models.experts.a.path", "no/such-dir"),
     "models.experts.a.path: 'no/such-dir' is no local folder"),
    ("models", "hub_id_offline", set_("models.base.path", "no-org/no-model@v2"),
     "models.base.path: 'no-org/no-model' is no local folder, and as a hub model at revision"),
    ("models", "model_is_file", expert("a_file"), "models.experts.a.path: model 'a'"),
    ("models", "model_no_config", expert("empty"), "has no config.json"),
    ("data", "chat_template_missing", set_("evaluators.0.chat_template", True),
     "evaluators.0.chat_template: true but the tokenizer in"),
    ("models", "model_bad_config_json", expert("bad_json"), "config.json' is not valid JSON"),
    ("models", "model_no_weights", expert("no_weights"), "no *.safetensors weights"),
    ("models", "pickle_only", expert("pickled"), "only pickle weights (pytorch_model.bin)"),
    ("models", "no_tokenizer", expert("no_tokenizer"), "has no tokenizer files"),
    ("models", "bad_safetensors_header", expert("bad_header"), "is not a valid safetensors file"),
    ("models", "sharded_missing_shard", expert("sharded_gap"), "lists shard"),
    ("shapes", "shape_mismatch", expert("wide"),
     "models.experts.a.path: tensor 'model.layers.0.mlp.down_proj.weight' has shape (32, 48)"),
    ("shapes", "sharded_shape_mismatch", expert("wide_sharded", "b"),
     "models.experts.b.path: tensor 'model.layers.0.mlp."),
    ("shapes", "fewer_layers", expert("shallow"),
     "models.experts.a.path: model 'a' has no tensor"),
    ("shapes", "architecture_mismatch", expert("mistral"), "must share one architecture"),
    ("shapes", "layer_groups_too_big", space(layer_groups=8),
     "search.space.layer_groups: 8 but the models have 4 layers; use at most 4"),
    ("data", "data_missing", set_("evaluators.0", lambda a: {
        "name": "accuracy", "data": a["tmp"] + "/nodata", "label": "good"}),
     "evaluators.0.data: evaluation data"),
    ("data", "split_missing", set_("evaluators.0.split", "train"), "train.jsonl' does not exist"),
    ("data", "held_out_missing", set_("evaluators.0", lambda a: {
        "name": "accuracy", "data": a["data_notest"], "label": "good"}),
     "evaluators.0.held_out_split: evaluation data"),
    ("data", "jsonl_malformed", data("jsonl_malformed"), "malformed.jsonl:3: not valid JSON"),
    ("data", "jsonl_not_object", data("jsonl_arrays"), "arrays.jsonl:1: expected a JSON object"),
    ("data", "jsonl_empty", data("jsonl_empty"), "empty.jsonl: the dataset is empty"),
    ("data", "jsonl_no_prompt", data("jsonl_texts"), "texts.jsonl:1: missing key(s) ['prompt']"),
    ("data", "accuracy_no_answer", data("jsonl_prompts"), "row 1 lacks ['answer']"),
    ("data", "entropy_no_field", data("jsonl_prompts", "entropy", field="text"),
     "prompts.jsonl:1: missing key(s) ['text']"),
    ("data", "perplexity_no_text", data("jsonl_texts", "perplexity"), "row 1 has no 'text'"),
    ("data", "lm_eval_include_missing", merged(
        lambda c, a: c.update(evaluators=[{"name": "lm_eval", "tasks": ["t"],
                                           "include_path": a["tmp"] + "/tasks"}],
                              objectives=[{"metric": "lm_eval/t/acc"}])),
     "evaluators.0.include_path:"),
    ("machine", "cuda_unavailable", set_("load.device", "cuda"), "load.device: 'cuda' but this"),
    ("machine", "cuda_index", set_("load.device", "cuda:7"), "load.device: 'cuda:7' but this"),
    ("machine", "gpus_unavailable", set_("resources.num_gpus", 1), "resources.num_gpus: 1 worker"),
    ("machine", "cpus_oversubscribed", set_("resources.workers", 4096), "resources.num_cpus: "),
    ("objectives", "unknown_metric", set_("objectives.0.metric", "accuracy/goood"),
     "objectives.0: metric 'accuracy/goood' is produced by no evaluator"),
    ("objectives", "weights_unknown_metric", set_("objectives.0", {"weights": {"acc/x": 1}}),
     "objectives.0: metric 'acc/x' is produced by no evaluator"),
    ("objectives", "cmaes_two_objectives", set_("objectives", [
        {"metric": "accuracy/good"}, {"metric": "accuracy/good", "direction": "minimize"}]),
     "search.sampler.name: cmaes is single-objective"),
    ("objectives", "test_split", set_("evaluators.0.split", "test"),
     "evaluators.0.split: is 'test': optimising on the test split"),
    ("objectives", "objectives_empty", set_("objectives", []),
     "objectives: needs at least 1 item(s), got 0"),
    ("objectives", "direction_typo", set_("objectives.0.direction", "maximise"),
     "objectives.0.direction: Input should be 'maximize' or 'minimize'"),
    # layer schedules (issue 12)
    ("schema", "schedule_unknown_kind", space(schedule={"kind": "cubic"}),
     "search.space.schedule.kind: Input should be 'linear' or 'piecewise'"),
    ("schema", "schedule_unknown_key", space(schedule={"kind": "linear", "knot": 3}),
     "search.space.schedule: unknown key 'knot'. Did you mean 'knots'"),
    ("schema", "schedule_piecewise_no_knots", space(schedule={"kind": "piecewise"}),
     "search.space.schedule.knots: a piecewise schedule needs knots"),
    ("schema", "schedule_linear_knots", space(schedule={"kind": "linear", "knots": 4}),
     "search.space.schedule.knots: a linear schedule has 2 parameters"),
    ("schema", "schedule_with_layer_groups", space(schedule={"kind": "linear"}, layer_groups=2),
     "search.space.schedule: a schedule replaces layer_groups"),
    ("types", "schedule_knots_string", space(schedule={"kind": "piecewise", "knots": "3"}),
     "search.space.schedule.knots: expected an integer, got '3'"),
    ("range", "schedule_one_knot", space(schedule={"kind": "piecewise", "knots": 1}),
     "search.space.schedule.knots: Input should be greater than or equal to 2"),
    ("shapes", "schedule_knots_above_layers", space(schedule={"kind": "piecewise", "knots": 6}),
     "search.space.schedule.knots: 6 but the models have 4 layers; use at most 4"),
]
NEEDS_LOCAL_MACHINE = {"gpus_unavailable", "cpus_oversubscribed", "cuda_unavailable",
                       "cuda_index"}


@pytest.fixture(scope="module")
def assets(tiny_models, tmp_path_factory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("bad_assets")
    out = make_assets(root, tiny_models)
    out["missing"] = str(root / "models" / "missing")
    read_only = root / "read_only"
    read_only.mkdir(mode=0o555)
    out["read_only"] = str(read_only)
    # root may write into a mode-555 folder: make it a read-only file system instead
    mounted = os.access(read_only, os.W_OK) and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
        capture_output=True,
    ).returncode == 0
    yield out
    if mounted:
        subprocess.run(["umount", "-l", str(read_only)], check=False)


def _tree(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a refused job reached the study or the worker pool")


def _write_job(case: Build, a: dict[str, str], path: Path) -> Path:
    content = case(a)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.fixture
def env(assets, tmp_path, monkeypatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(driver, "open_study", _refuse)
    monkeypatch.setattr(driver, "WorkerPool", _refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return {**assets, "tmp": str(tmp_path), "run_dir": str(tmp_path / "run")}


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.mark.parametrize(("kind", "case", "build", "expect"), CASES, ids=[c[1] for c in CASES])
def test_bad_config_refused_in_one_line(kind, case, build, expect, env, assets, capsys):
    if case in NEEDS_LOCAL_MACHINE and _ray_started():
        pytest.skip("a Ray started by another module brings its own resources")
    if case == "run_dir_read_only" and os.access(assets["read_only"], os.W_OK):
        pytest.skip("no read-only folder here: running as root and cannot mount a tmpfs")
    if case.startswith("cuda") or case == "gpus_unavailable":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    tmp = Path(env["tmp"])
    job = _write_job(build, env, tmp / "job.yaml")
    before, assets_before = _tree(tmp), _tree(Path(assets["base"]).parent)
    ray_before = _ray_started()

    rc = cli.main(["search", str(job), "--no-progress"])

    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("evomerge search: error: "), err
    assert expect in lines[0]
    assert not Path(env["run_dir"]).exists()
    assert _tree(tmp) == before and _tree(Path(assets["base"]).parent) == assets_before
    assert _ray_started() == ray_before


def test_corpus_size_and_classes():
    kinds = {c[0] for c in CASES}
    assert len(CASES) >= 60 and len({c[1] for c in CASES}) == len(CASES)
    assert {"schema", "types", "range", "nan_inf", "yaml", "names", "run_dir", "models",
            "shapes", "data", "machine", "objectives"} <= kinds


def test_good_config_validates(env, capsys):
    job = _write_job(good, env, Path(env["tmp"]) / "job.yaml")
    assert cli.main(["validate", str(job)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "name: bad-run" in captured.out
    assert not Path(env["run_dir"]).exists()


def test_validate_notes_an_unbuilt_toy_suite(env, capsys):
    cfg = good(env)
    cfg["toy_suite"] = {"dir": "toy", "size": "tiny"}
    cfg["models"]["experts"]["a"]["path"] = "toy/experts/a"
    job = _write_job(lambda a: cfg, env, Path(env["tmp"]) / "job.yaml")
    assert cli.main(["validate", str(job)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "toy_suite.dir 'toy' is not built yet" in err[0]
    assert not Path(env["tmp"], "toy").exists()


@pytest.mark.parametrize("case", ["trials_true", "shape_mismatch"])
def test_refused_without_importing_ray(case, env, tmp_path):
    """In a fresh process, a refused job never imports ray."""
    build = next(c[2] for c in CASES if c[1] == case)
    job = _write_job(build, env, tmp_path / "job.yaml")
    code = (
        "import sys; from evomerge.cli import main; rc = main(['search', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)"
    )
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
