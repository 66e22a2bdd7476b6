#!/usr/bin/env bash
# Regenerates every committed figure under results/ (run from the repository root after `make test`
# or `make demo` has created .venv). Each step refuses to overwrite what exists; pass FORCE=--force to redo.
# Machine used for the committed figures: 2 CPU cores, 24 GB, no GPU (see results/README.md for times).
set -euo pipefail
B=.venv/bin/abscert-bench
F=${FORCE:-}
OUT=results/mnist-dm_small-eps0.1

$B data prepare

# Issue 2: natural / AbsCert (d = 0.2) / IBP / CROWN-IBP, DM_Small, eps = 0.1, 10,000 real MNIST digits.
$B compare --dataset mnist --model dm_small --eps 0.1 --d 0.2 --epochs 20 --warmup-epochs 1 --ramp-epochs 10 \
  --limit 500 --verifiers abscert-paper,abscert-sound,ibp,crown,pgd --out $OUT $F
# alpha-CROWN costs ~7 s per MNIST sample on 2 CPU cores: first 50 test images only.
for m in natural ibp crown-ibp; do
  $B verify $OUT/mnist_dm_small_eps0.1_$m --verifiers alpha-crown --limit 50 $F
done
# Issue 3: the paper check and abscert-sound on the whole MNIST test split (2,004 images).
$B verify $OUT/mnist_dm_small_eps0.1_abscert_d0.2_point --verifiers abscert-paper,abscert-sound $F
$B table $OUT --csv $OUT/table.csv > $OUT/table.md
$B table $OUT --sound-stages > $OUT/sound_stages.md

# Issue 3: one Fashion-MNIST row (AbsCert DM_Small, d = 0.2, eps = 0.1; first 200 test images).
FM=results/fashion-mnist-dm_small-eps0.1
$B train --dataset fashion-mnist --model dm_small --method abscert --d 0.2 --eps 0.1 --epochs 5 --out $FM/abscert $F
$B verify $FM/abscert --verifiers abscert-paper,abscert-sound --limit 200 $F
$B table $FM --sound-stages > $FM/sound_stages.md

# Issue 2: training speed ratios (one run, interleaved).
$B bench --dataset mnist --epochs 3 > results/speed_benchmark.md

# Issue 4: a small VNN-COMP benchmark folder (IBP, CROWN-IBP, AbsCert; both AbsCert encodings) and its run-back.
for m in ibp crown-ibp abscert_d0.2_point; do
  $B export $OUT/mnist_dm_small_eps0.1_$m --out results/vnncomp/$m --samples 3 --seed 0 --timeout 30 --vnnlib2 $F
  $B vnncomp run results/vnncomp/$m $F
done

# Issue 5: the comparison harness. Each `run` resumes a store that exists (skipping complete cells); FORCE=--force
# discards it and starts again. The benchmark runs quick three times into temporary stores and prints the ratios.
# `run` exits 1 when a cell failed (rerunning the same command retries failed cells); the stores are still written.
# For committing: saved trainings of unfinished cells (partial/) are dropped and checkpoints over 3 MiB replaced
# by stubs (`slim`).
for suite in quick mnist fashion-mnist scalability; do
  $B run specs/$suite.toml --workers 2 --out results/$suite $F || true
  rm -rf results/$suite/partial
  $B slim results/$suite --max-mb 3
done
.venv/bin/python benchmarks/harness_benchmark.py > results/harness_benchmark.md
