"""The worker layer: one worker per device (rank) holds a shard of the model, its KV cache and a
model runner that turns a `SchedulerOutput` into a forward pass and sampled tokens."""
