"""``pitome-mllm sweep``: run a suite of lmms-eval evaluations, resume it, and tabulate it.

A suite file (``eval/suites/*.yaml``) names lmms-eval tasks (with the metric that stands for
accuracy), the model arguments every run shares, and the runs: each run is a set of model
arguments of the suite's ``lmms_model`` (``pitome_llava_hf`` unless it names ``pitome_qwen2_5_vl`` or
``pitome_qwen3_vl``), where a list value sweeps over its items::

    name: token_budgets
    tasks: {gqa: "exact_match,none", mme: "mme_perception_score,none"}
    model_args: {prompt_format: llava_v1}
    baseline: none
    runs:
      none: {method: none}
      pitome: {method: pitome, target_tokens: [64, 128, 192]}

Every (task, run) is one ``python -m lmms_eval ... --verbosity DEBUG`` subprocess writing into
``OUTPUT/runs/<task>/<run>/``: ``patch_config.json`` before it starts, lmms-eval's own output in
``lmms_eval/``, the plugin's ``pitome_record.json`` (patch summary, peak memory, mean per-sample
cost), and ``result.json`` last, written atomically once the metric has been read back. A run
whose ``result.json`` exists is skipped, so an interrupted sweep loses no finished run.
``pitome-mllm sweep --aggregate OUTPUT`` turns the ``result.json`` files into ``summary.csv``,
``summary.md`` and ``accuracy_vs_tokens.png``.

lmms-eval exits 0 even when the evaluation raised unless ``--verbosity DEBUG`` is given, so a run
counts as done only when its results file holds the metric.
"""

from __future__ import annotations

from .aggregate import (
    SUMMARY_COLUMNS,
    aggregate,
    best_per_budget_table,
    load_results,
    mark_best_per_budget,
    markdown_table,
    plot_accuracy_vs_tokens,
    summary_rows,
    write_csv,
)
from .process import SweepInterrupted, SweepLocked
from .runner import (
    RunFailed,
    SweepStopped,
    execute_run,
    find_results_file,
    lmms_eval_command,
    prepare_output,
    print_outcome,
    read_metric,
    read_stored_result,
    run_dir,
    run_suite,
    write_json_atomically,
)
from .schema import SuiteError
from .suite import (
    LOG_FILE,
    MODEL_NAME,
    PATCH_CONFIG_FILE,
    PATCH_FIELDS,
    RECORD_FILE,
    RESULT_FILE,
    Run,
    Suite,
    check_runs_expand,
    load_suite,
    parse_model_args,
    planned_runs,
    scalar_from_text,
)

__all__ = [
    "SuiteError",
    "SweepInterrupted",
    "SweepLocked",
    "LOG_FILE",
    "MODEL_NAME",
    "PATCH_CONFIG_FILE",
    "PATCH_FIELDS",
    "RECORD_FILE",
    "RESULT_FILE",
    "Run",
    "RunFailed",
    "SUMMARY_COLUMNS",
    "Suite",
    "SweepStopped",
    "aggregate",
    "best_per_budget_table",
    "check_runs_expand",
    "execute_run",
    "find_results_file",
    "lmms_eval_command",
    "load_results",
    "load_suite",
    "mark_best_per_budget",
    "markdown_table",
    "parse_model_args",
    "planned_runs",
    "plot_accuracy_vs_tokens",
    "prepare_output",
    "print_outcome",
    "read_metric",
    "read_stored_result",
    "run_dir",
    "run_suite",
    "scalar_from_text",
    "summary_rows",
    "write_csv",
    "write_json_atomically",
]
