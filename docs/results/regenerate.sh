#!/usr/bin/env bash
# Regenerates every committed result under docs/results with the current code, in the order README shows them
# (about 4 hours on the 2-core CPU machine; each study writes report.md, results.json/csv, plots and per-run
# gradient_health.json). Needs CIFAR-10 at ../shared/cifar10 (or DATA=...). Usage: bash docs/results/regenerate.sh
# [names...], names from: quickstart rnn rnn-medium optimizers depth augmentation augmentation-medium transformer
# edge-of-stability gan gan-6000 notebook examples ("examples": README's two one-line demonstrations, printed to
# docs/results/examples/*.txt; "-medium": the grid at budget cpu-medium, one thread per run as committed;
# "transformer" needs the text at ../shared/text or TEXT=...). REJUDGE=1 trains nothing: each study reruns over its
# committed runs, judges their saved gradient records again under the current rules and rewrites its report (seconds;
# for a change of the verdict rules).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/cifar10}
TEXT=${TEXT:-../shared/text}
GAN_ARGS=(--data-dir "$DATA" --fid-checkpoint docs/results/gan/resnet20-classifier.ckpt --fid-samples 5000
  --width 32 --batch-size 64 --log-every 25 --sample-every 250 --seed 42 --runs minimax non-saturating hinge-spectral-norm)

# A study reuses (and judges again) the finished runs it finds in its output folder: start from an empty one, unless
# REJUDGE=1 asks for exactly that.
fresh() {
  [ "${REJUDGE:-0}" = 1 ] || rm -rf "docs/results/$1"
}

regenerate() {
  local name=$1
  case $name in
    gan | gan-6000)
      # The classifier checkpoint the FID uses lives in docs/results/gan: only the runs and reports are replaced.
      find "docs/results/$name" -mindepth 1 -maxdepth 1 ! -name '*.ckpt' -exec rm -rf {} +
      local batches=2500
      [ "$name" = gan-6000 ] && batches=6000
      python examples/gan_losses.py "${GAN_ARGS[@]}" --batches "$batches" --out "docs/results/$name"
      ;;
    rnn-medium | augmentation-medium)
      fresh "$name"
      OMP_NUM_THREADS=1 stabilize study "${name%-medium}" --budget cpu-medium --data-dir "$DATA" --out "docs/results/$name"
      ;;
    transformer)
      fresh transformer
      OMP_NUM_THREADS=1 STABILIZE_TEXT_DIR="$TEXT" stabilize study transformer --out docs/results/transformer
      ;;
    edge-of-stability)
      python examples/edge_of_stability.py --data-dir "$DATA" --out docs/results/edge-of-stability \
        --lrs 0.03 0.04 0.06 --steps 500 --every 25
      ;;
    notebook)
      # The kernel runs in notebooks/: a relative data path must not be read from there.
      STABILIZE_CIFAR10_DIR="$(realpath "$DATA")" jupyter execute --inplace --timeout=-1 notebooks/vanishing_gradients.ipynb
      ;;
    examples)
      mkdir -p docs/results/examples
      stabilize fit --config configs/deep_plain_sigmoid.yaml --data.data_dir "$DATA" --trainer.max_steps 100 \
        --trainer.enable_progress_bar false 2>&1 | tee docs/results/examples/deep_plain_sigmoid.txt
      stabilize fit --config configs/exploding_relu.yaml --data.data_dir "$DATA" --trainer.enable_progress_bar false \
        2>&1 | tee docs/results/examples/exploding_relu.txt
      ;;
    *)
      fresh "$name"
      stabilize study --config "configs/study/$name.yaml" --data-dir "$DATA" --out "docs/results/$name"
      ;;
  esac
}

for name in "${@:-quickstart rnn rnn-medium optimizers depth augmentation augmentation-medium transformer edge-of-stability gan gan-6000 notebook examples}"; do
  for one in $name; do
    echo "== $one: $(date -u +%H:%M:%S)"
    regenerate "$one"
  done
done
echo "== done: $(date -u +%H:%M:%S)"
