"""esper_func: morphogenetic training as a functional, vectorized core on PyTorch."""
