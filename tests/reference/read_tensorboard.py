"""Reads the TensorBoard event files under a directory with TensorBoard's own reader and prints
every scalar as JSON: {"tag": [[step, value], ...]}. Used by tests/tensorboard.rs.

    python read_tensorboard.py DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
