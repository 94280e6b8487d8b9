"""The engine: what training, evaluation and serving share beneath them.

    parallel        the device mesh, replicated and sharded global arrays, the cluster start
    optim           learning-rate schedules, weight-decay and frozen-stage masks, the optax chain
    checkpointing   TrainState, its creation, Orbax save/restore, preemption
    workdir         the one owner of a workdir's files (config.json, categories.json, checkpoints/, eval metrics)
    progress        TensorBoard scalars, the console progress line and the non-finite check
    datasets        generating and building the configured dataset once per cluster
"""
