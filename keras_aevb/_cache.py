"""Per-model caches of the compiled functions that modules beside the model build for it.

One owner for them: `model_cache(model, name)`. The caches live in the model's `__dict__`, not
in attributes, because Keras tracks what is assigned to a model's attributes (a dict of
functions would become tracked state and be saved); and not in a module-level
`weakref.WeakKeyDictionary`, because the cached functions close over the model: a weak-key
entry whose value holds its key keeps the model alive forever, where the cycle
model -> cache -> function -> model is collected with the model.
"""

__all__ = ["model_cache"]


def model_cache(model, name):
    """The model's cache `name` (a dict, created empty on first use)."""
    caches = model.__dict__.setdefault("_keras_aevb_caches", {})
    return caches.setdefault(name, {})
