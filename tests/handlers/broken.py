"""A handler that cannot load: TorchServe calls handle(None, context) at load time."""


def handle(data, context):
    raise RuntimeError("cannot load the weights: broken.pt is missing")
