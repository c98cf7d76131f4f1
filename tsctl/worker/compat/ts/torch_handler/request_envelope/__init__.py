"""Request envelopes (`service_envelope`): one module per protocol, TorchServe's names.

`body`, `json`, `kserve` and `kservev2` each define one envelope class; the worker applies the
one the server's `service_envelope` names (`tsctl.worker.envelope.wrap`).
"""
