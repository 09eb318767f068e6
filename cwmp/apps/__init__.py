"""Applications built on the CWMP core that measure or train: the demo, validation, the federated
benchmark and its Flower adapter. They may import meters and optional frameworks; the core
(``cwmp.masks``, ``cwmp.pruner``, ``cwmp.feedback``, ``cwmp.costmap``) must not."""
