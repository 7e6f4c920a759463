"""Pipeline stages of the clothing classifier: prepare, train, evaluate, serve."""

import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown the stages' own
# log; warnings and errors still show. Set TF_CPP_MIN_LOG_LEVEL=0 to see all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
