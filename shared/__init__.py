"""vlmq's bottom layer: what both services need, by concern (config, store, queue, web, media, modeling).

Nothing here imports a service, `cuda_ext` or the `vlmq` application package (`.importlinter`).
"""
