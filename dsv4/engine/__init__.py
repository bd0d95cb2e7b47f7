"""The serving engine: requests, scheduling, model runner and sampler."""
