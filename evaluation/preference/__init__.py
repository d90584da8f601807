"""Human preference studies: blind side-by-side rating of models' samples in the browser (`serve`), and win rates
and Bradley-Terry scores with bootstrap intervals (`report`). Run it as `python -m evaluation.preference`."""
