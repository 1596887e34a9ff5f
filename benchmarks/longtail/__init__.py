"""Real long-tailed benchmark on Fashion-MNIST (issue 10): cohort builder and method x seed runner."""
