"""The measure layer: everything that runs a model for a report.

`efficiency` (params, FLOPs, latency of a student), `energy` (inference energy per 10,000 images),
`entropy` (the teachers' softmax entropy) and `show` (qualitative predictions; it retrains the
students through `harness.reproduce`). Each returns plain data (numbers, dicts, dataclasses without
tensors) that the CLI hands to `harness.report`, which only reads; `harness.report` never imports
this package.
"""
