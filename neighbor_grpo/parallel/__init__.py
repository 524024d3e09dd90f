"""Several processes: who does what and the few collectives the loop needs (`distributed`), the trained net
replicated (DDP) or sharded (FSDP2) and whole tensors of shards (`wrapping`), and which process owns which
candidates of an iteration (`partition`).

Layer 1 (docs/design.md): imports only `config`, `maths`, `models` and each other.
"""
