"""Stands in for ``python -m lmms_eval`` in the sweep tests: writes what lmms-eval and the plugin write.

Environment: ``FAKE_LMMS_EVAL_FAIL=<method>`` fails that method's runs the way lmms-eval does
without ``--verbosity DEBUG`` (exit 0, no results); ``FAKE_MODE=crash`` fails before evaluating,
as a broken install does; ``FAKE_MODE=sleep`` hangs (to be interrupted); ``FAKE_MODE=fork`` starts
a sleeping worker in its own process group and waits for it, as ``torchrun`` does.
``FAKE_WORKER_PID=<file>``: a sleeping process writes its pid there.
"""

import json
import os
import subprocess
import sys
import time

args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=False))
model_args = dict(item.split("=", 1) for item in args["--model_args"].split(","))
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "crash":
    print('Traceback (most recent call last):\n  File "<frozen runpy>", line 1', flush=True)
    print("ModuleNotFoundError: No module named 'lmms_eval'", flush=True)
    sys.exit(1)
if mode == "fork":
    worker = subprocess.Popen(
        [sys.executable, *sys.argv], env={**os.environ, "FAKE_MODE": "sleep"}, start_new_session=True
    )
    sys.exit(worker.wait())
if mode == "sleep":
    if os.environ.get("FAKE_WORKER_PID"):
        pid_file = os.environ["FAKE_WORKER_PID"]
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    print("evaluating", flush=True)
    time.sleep(600)
if os.environ.get("FAKE_LMMS_EVAL_FAIL") == model_args.get("method"):
    sys.exit(0)
folder = os.path.join(args["--output_path"], "model")
os.makedirs(folder, exist_ok=True)
score = {"none": 0.8, "pitome": 0.7, "tome": 0.6}[model_args["method"]]
tokens = int(model_args.get("target_tokens", 64))
with open(os.path.join(folder, "20260101_results.json"), "w") as f:
    json.dump({"results": {args["--tasks"]: {"exact_match,none": score, "alias": args["--tasks"]}}}, f)
with open(model_args["record"], "w") as f:
    json.dump({"samples": 2, "mean_visual_tokens": tokens, "mean_ttft_s": 0.01 * tokens, "patch": {}}, f)
