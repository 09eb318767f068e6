"""The federated benchmark: FedAvg with sparsified client updates (Top-K vs CWMP at equal energy),
error feedback and non-IID Dirichlet partitions, on two engines (``local`` in process; ``flower``
on Flower's simulation runtime). See docs/federated.md.

Importing this package imports neither Flower nor the meters; ``flower_app`` needs ``flwr``.
"""
