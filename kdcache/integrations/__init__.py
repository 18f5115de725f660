"""Integrations with training frameworks, each an optional extra imported on its own:

- :mod:`kdcache.integrations.hf`: ``KDTrainer`` for 🤗 ``transformers.Trainer`` (``kdcache[hf]``);
- :mod:`kdcache.integrations.lightning`: a ``LightningDataModule`` and a KD mix-in (``kdcache[lightning]``).
"""

__all__: list[str] = []
