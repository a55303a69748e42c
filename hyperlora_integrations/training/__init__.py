"""Training and evaluation of the hypernetworks (needs the ``[train]`` extra for real data)."""
