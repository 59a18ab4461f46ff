"""fastlora's benchmark suite: ``python -m benchmarks`` (what ``make bench`` runs).

Not an installed package: run it from the repository root. See benchmarks/README.md.
"""
