#!/usr/bin/env bash
# ./run.sh                      train the MNIST example (configs/mnist_exp_0.json)
# ./run.sh CONFIG [ARGS...]     python main.py CONFIG [ARGS...]   (--set, --resume, --force)
# ./run.sh test [PYTEST ARGS]   run the test suite on every core (or the test files/ids given)
# ./run.sh new NAME             start a new task (agent, graph, data loader, config, test)
# ./run.sh list [PATTERN]       the experiments in experiments/ and how they went (--sort best, ...)
# ./run.sh compare EXP EXP...   the config keys that differ between experiments, metrics side by side
# ./run.sh sweep SWEEP.json     a hyperparameter search (--workers N, --status; docs/sweeps.md)
# ./run.sh tensorboard ARGS     TensorBoard from the project's environment (--logdir experiments)
# ./run.sh torchrun ARGS        torchrun from the project's environment (several processes)
# ./run.sh --help               this text (./run.sh CONFIG --help: main.py's options)
# First use sets up .venv from requirements.txt, unless the current python already has the
# packages. PYTHON=/path/to/python picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-}" in
    -h|--help)  # the comment block above, before any environment is set up
        sed -n '2,/^[^#]/{/^#/!d;s/^# \{0,1\}//;p}' "$(basename "$0")"
        exit 0 ;;
esac

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256
# Found without importing them (importing torch alone takes seconds).
CHECK='import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in "torch torchvision numpy easydict tensorboardX tensorboard tqdm gdown gymnasium pygame sklearn pytest xdist optuna matplotlib mlflow onnx onnxscript onnxruntime".split()))'

want=$(sha256sum requirements.txt | cut -d" " -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    PYTHON=$VENV/bin/python
elif [ ! -d "$VENV" ] && "$PYTHON" -c "$CHECK" 2>/dev/null; then
    :  # this environment already has everything
else
    echo "run.sh: setting up $VENV from requirements.txt (once; a few minutes)" >&2
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt >&2
    echo "$want" > "$STAMP"
    PYTHON=$VENV/bin/python
fi

case "${1:-}" in
    "")   exec "$PYTHON" main.py configs/mnist_exp_0.json ;;
    test)
        shift
        # The whole suite runs on every core (pytest-xdist), the tests that read one training run
        # on the worker that trains it (their xdist_group mark); test files or ids that are named
        # run in this one process (a few tests start faster without workers).
        where="tests -n auto --dist loadgroup"
        for arg in "$@"; do [ -e "${arg%%::*}" ] && where= && break; done
        exec "$PYTHON" -m pytest $where "$@" ;;
    tensorboard) shift; exec "$PYTHON" -m tensorboard.main "$@" ;;
    torchrun)    shift; exec "$PYTHON" -m torch.distributed.run "$@" ;;
    *)    exec "$PYTHON" main.py "$@" ;;
esac
