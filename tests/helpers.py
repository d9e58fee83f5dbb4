"""Shared test constants: a tiny model that trains in seconds on 2 CPU cores."""

TINY_MODEL = ["model.preset=custom", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
              "model.max_seq_len=32", "embeddings.item_dim=16", "embeddings.side_dim=8", "data.batch_size=4",
              "heads.next_item.uniform_negatives=16", "heads.next_item.in_batch_negatives=16",
              "train.log_every=1", "train.device=cpu", "train.timeout_s=120"]
