#!/usr/bin/env bash
# Regenerates every committed figure under results/ (run from the repository root after `make test` or
# `make demo` has created .venv). Each step refuses to overwrite what exists; pass FORCE=--force to redo.
# Machine used for the committed figures: 2 CPU cores, 24 GB, no GPU (see results/README.md for times).
set -euo pipefail
B=.venv/bin/abscert-bench
F=${FORCE:-}

$B data prepare

# The harness stores. Each `run` resumes a store that exists (skipping complete cells); FORCE=--force discards it
# and starts again. `run` exits 1 when a cell failed (rerunning the same command retries failed cells); the stores
# are still written. For committing: saved trainings of unfinished cells (partial/) are dropped and checkpoints over
# 3 MiB replaced by stubs (`slim`).
for suite in mnist; do
  $B run specs/$suite.toml --workers 2 --out results/$suite $F || true
  rm -rf results/$suite/partial
  $B slim results/$suite --max-mb 3
done

# AbsCert at the paper's own eps 0.1 (pixel 0.05): the official protocol (test-set selection) and the clean one
# (validation selection), DM_Small; the paper check on all 2,004 test images, abscert-sound on the first 500.
# (specs/mnist-official.toml is the same with FC3 too, as a harness store.)
O=results/mnist-official
for p in official; do   # the clean protocol: specs/mnist-official.toml
  $B train --dataset mnist --model dm_small --method abscert --protocol $p --eps 0.05 --out $O/dm_small_$p $F
  $B verify $O/dm_small_$p --verifiers abscert-paper $F
  $B verify $O/dm_small_$p --verifiers abscert-sound --limit 500 --timeout 1.0 $F
done
$B table $O --csv $O/table.csv > $O/table.md

# Training speed ratios (one interleaved run; quiet machine).
$B bench --dataset mnist --epochs 5 > results/speed_benchmark.md

# Not committed in this version (run them for the figures): the equal-budget comparison and the quick suite,
#   $B run specs/mnist-budget.toml --workers 2 --out results/mnist-budget
#   $B run specs/quick.toml --workers 2 --out results/quick
# and VNN-COMP folders of the mnist store's DM_Small eps 0.1 models, with their run-back:
#   for cell in ibp crown-ibp abscert-official; do
#     $B export results/mnist/cells/mnist_dm_small_eps0.1_${cell}_s0/run --out results/vnncomp/$cell --samples 3 \
#       --seed 0 --timeout 30 --vnnlib2
#     $B vnncomp run results/vnncomp/$cell
#   done
