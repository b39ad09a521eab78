#!/usr/bin/env bash
# The PyTorch Cookiecutter's baselines on Iris, recorded so they can be re-run as they were:
#   bash experiments/baseline_experiments.sh            (from anywhere; extra args go to each run)
# Each run is experiments/iris_<network>/; re-running starts them over (--force). Compare them with
#   ./run.sh list
# The same search as a sweep (every network x init x learning rate, over 3 seeds, mean +- std,
# resumable, on several workers): ./run.sh sweep configs/sweeps/iris_baselines.json
set -euo pipefail
cd "$(dirname "$0")/.."

for network in linear mlp mlp_fixed; do
    ./run.sh configs/iris_exp_0.json --force --set network="$network" --set exp_name="iris_$network" "$@"
done
./run.sh list
