"""The shared machinery of the Parameter Golf harness, one concern per module, in layers (each
imports only the ones before it): config, contract, runtime, data, bpb, optim, quant, codec,
container, evaluation, ttt, modes, telemetry, train; the model families in golf/models. The three
`train_*.py` at the top of the checkout are bundles generated from it (`python -m golf.bundle`).
"""
