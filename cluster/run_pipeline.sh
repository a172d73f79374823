#!/usr/bin/env bash
# Reproduce the whole DVC pipeline inside the job's copy of the project on a Ray cluster.
#
# The default entrypoint of `python -m pipeline submit` (see DEFAULT_ENTRYPOINT in pipeline/jobs/submit.py) and
# of cluster/kuberay/rayjob.yaml. Extra arguments go to `dvc repro` (e.g. a stage name, or --force).
#
# Ray uploads the project without .git, and DVC refuses to run outside a git repository unless told
# there is none. The switch goes into .dvc/config.local, which `submit` never uploads, so the project's
# committed .dvc/config stays as it is and this copy alone runs without git.
set -euo pipefail

# Parameter overrides for this run, e.g. PIPELINE_SET="runtime.use_gpu=true runtime.num_workers=4": the
# cluster's counterpart of `dvc exp run -S`, which needs git. Applied first, before DVC is touched. After
# `--` every word is an assignment: an option-looking one (`--help` would print help and exit 0) is refused
# with exit 2, and `set -e` stops the job there, before `dvc repro` could run without the overrides.
if [ -n "${PIPELINE_SET:-}" ]; then
    # shellcheck disable=SC2086  # one word per assignment, by design
    python -m pipeline set-params -- $PIPELINE_SET
fi

dvc() { python -m dvc "$@"; }  # the job's Python, whatever is first on PATH

if [ ! -d .dvc ]; then
    dvc init --no-scm --quiet
fi
dvc config --local core.no_scm true

if dvc remote default >/dev/null 2>&1; then
    # With a remote, a stage whose inputs already ran anywhere (this cluster, a laptop) is restored from
    # the remote's run-cache instead of recomputed (--pull fetches the run-cache and the data), and what
    # ran here is pushed back with its run-cache entries: on a laptop at the same commit and params,
    # `dvc repro --pull` then restores every stage without running one.
    dvc repro --pull "$@"
    dvc push --run-cache
else
    dvc repro "$@"
    echo "run_pipeline.sh: no DVC remote configured, so the stage outputs stay in $(pwd), a temporary" \
        "directory on the node that ran this job. The model is in the MLflow registry." >&2
fi
