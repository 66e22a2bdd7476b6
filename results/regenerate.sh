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
for suite in mnist mnist-budget quick; do
  $B run specs/$suite.toml --workers 2 --out results/$suite $F || true
  rm -rf results/$suite/partial
  $B slim results/$suite --max-mb 3
done

# VNN-COMP benchmark folders for three MNIST DM_Small eps 0.1 models of the mnist store (IBP, CROWN-IBP and the
# official-protocol AbsCert; AbsCert: hull and deployed encodings), 3 test images each, and their run-back.
for cell in ibp crown-ibp abscert-official; do
  $B export results/mnist/cells/mnist_dm_small_eps0.1_${cell}_s0/run --out results/vnncomp/$cell --samples 3 \
    --seed 0 --timeout 30 --vnnlib2 $F
  $B vnncomp run results/vnncomp/$cell $F
done

# Training speed ratios (one interleaved run; quiet machine).
$B bench --dataset mnist --epochs 5 > results/speed_benchmark.md
