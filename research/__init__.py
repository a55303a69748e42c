"""The experiments behind the hypernetworks' documented limits: not installed, not imported by the package.

Run each from the repository root as ``python -m research.<name>``; research/README.md lists
them, the question each answered and its result file.
"""
