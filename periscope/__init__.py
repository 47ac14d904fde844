"""Periscope's small shared library.

The top-level scripts (``train_model.py``, ``batch_processor.py``, ...) tell the
story of each Lambda layer; this package holds only what two or more layers
must share so they cannot drift apart: the trip schema and its validation
rules, the feature engineering used for training *and* inference, the
mergeable view aggregates, storage helpers and configuration.
"""
