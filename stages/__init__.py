"""Pipeline stages of the clothing classifier: prepare, train, evaluate, serve."""
