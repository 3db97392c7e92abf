"""The CPU inference engine: the decode loop (`decode`: per-sample random streams, a KV cache reserved up front)
and the fast decode step (`fast`: weights packed for oneDNN, the one place that decides whether it runs).
The rollout backends, evaluation, serve and chat sample through it; nothing in it knows about training."""
