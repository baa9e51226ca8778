"""Will a config fit a TPU slice: the step compiled for a topology, its collectives and
the input it needs."""
