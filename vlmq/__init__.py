"""vlmq's application layer: the `vlmq` command line, the local stack, bulk captioning, demo checkpoints.

It sits on top of the two services and `shared/` and is the only package that imports both services.
"""
