"""The models, teacher and student, as kdcache runs them.

- :mod:`.forward`  the device, autocast, the call by input structure, the output picked
- :mod:`.capture`  submodule outputs captured by dotted name (forward hooks)
- :mod:`.hf`       ``hf:PATH`` models and tokenizers from a local directory (the ``hf`` extra)
- :mod:`.placement` a model on one device or spread by accelerate's device map; offloaded weights
"""
